"""The FLOP counter lives in the library (`sparse_robust.flops`: the report shows FLOPs too);
the benchmarks import it from here as before."""

from sparse_robust.flops import matmul_flops  # noqa: F401  (re-exported)
