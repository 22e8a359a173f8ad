"""Matmul/conv FLOPs of a JAX function, counted on its jaxpr with loop trip counts.

XLA's ``cost_analysis`` counts the body of a loop once, so for a ``lax.scan`` of training steps,
each with a ``fori_loop`` of PGD steps, it undercounts by orders of magnitude. Here every
``dot_general`` and ``conv_general_dilated`` is counted (2 FLOPs per multiply-add) and multiplied
by the lengths of the scans around it; ``vmap`` is already folded into the shapes. Elementwise
work is ignored: the figure is the matmul work, to compare with matmul throughput.

The benchmarks divide it by measured time; the report shows `forward_flops` of each unit's
network (after `pruning.compact` where it applies), beside its weight count.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars)
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lhs_contract)
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2 * out * contract


def _conv_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars)
    dims = eqn.params["dimension_numbers"]
    out = math.prod(eqn.outvars[0].aval.shape)
    kernel_spatial = math.prod(rhs.shape[d] for d in dims.rhs_spec[2:])
    in_features_per_group = rhs.shape[dims.rhs_spec[1]]
    return 2 * out * kernel_spatial * in_features_per_group


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "while":
            # Trip count unknown statically: count one iteration (our loops are scans).
            total += _jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)
        else:
            for param in eqn.params.values():
                sub = getattr(param, "jaxpr", param)
                if hasattr(sub, "eqns"):
                    total += _jaxpr_flops(sub)
    return total


def matmul_flops(fn, *args, **kwargs) -> int:
    """FLOPs of the matmuls and convolutions ``fn(*args, **kwargs)`` executes."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def forward_flops(model, variables, sample_input) -> int:
    """FLOPs of one forward pass of `model` (eval mode) on one example shaped like
    `sample_input[:1]`. Give a model with `conv_impl="xla"` to count a direct convolution's work
    (the patches and Winograd paths multiply a different number of times)."""
    x = jax.ShapeDtypeStruct((1, *np.shape(sample_input)[1:]), np.float32)
    return matmul_flops(lambda v, x: model.apply(v, x, train=False), variables, x)


if __name__ == "__main__":  # a self-check against the closed form of a scanned matmul
    a = np.ones((64, 32), np.float32)
    f = lambda a: jax.lax.scan(lambda c, _: (c @ np.ones((32, 32), np.float32), None), a, None,
                               length=5)[0]
    print(matmul_flops(f, a), "==", 5 * 2 * 64 * 32 * 32)
