"""Shared benchmark helpers: timing, the machine's matmul throughput, XLA FLOP counts, tables.

Speeds are reported against the matmul throughput measured in the same run, so ratios stay
meaningful across machines (and under load from other processes).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp


def time_fn(fn: Callable, *args, warmup: int = 1, repeats: int = 5, reduce: str = "best") -> float:
    """Seconds per call of `fn(*args)`, waiting for the result (`jax.block_until_ready`).

    `warmup` calls (compilation) are not timed; `reduce` is "best" (minimum: the least disturbed
    by other processes) or "median".
    """
    if reduce not in ("best", "median"):
        raise ValueError(f"reduce={reduce!r} is not supported; allowed values: ['best', 'median'].")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats!r}, warmup={warmup!r} are invalid; allowed: repeats >= 1, warmup >= 0.")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) if reduce == "best" else statistics.median(times)


def matmul_flops_per_second(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achieved FLOP/s of a jitted n×n @ n×n matmul (2·n³ FLOPs), best of `repeats`."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), dtype) for k in keys)
    seconds = time_fn(jax.jit(jnp.matmul), a, b, warmup=1, repeats=repeats)
    return 2.0 * n**3 / seconds


def compiled_flops(jitted_fn, *args, **kwargs) -> Optional[float]:
    """FLOPs of one call as counted by XLA's cost analysis (None where the backend gives none).

    XLA counts a while loop's body once, whatever its trip count: multiply per-step counts
    yourself for loops (`lax.fori_loop`, `lax.scan`).
    """
    analysis = jitted_fn.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(analysis, Sequence):  # Older jax: one dict per device.
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def print_rows(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> None:
    """Prints dict rows as an aligned text table (columns default to the first row's keys)."""
    if not rows:
        return
    columns = list(columns or rows[0])
    cells = [[_format(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
