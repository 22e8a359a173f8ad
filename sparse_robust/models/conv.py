"""The models' convolution layer: `nn.Conv` with a choice of implementation, and the choice.

`Conv` is an `nn.Conv` (same fields, parameters `kernel` [kh, kw, cin, cout] and `bias` [cout],
same initialisation, same outputs up to float rounding), so masks, checkpoints, pruning,
diagnostics and inheritance see no difference. Its `conv_impl` picks how the convolution runs:

* "xla": XLA's convolution op, as `nn.Conv` runs it;
* "patches": one matrix product over patches (`sparse_robust.models.patches`);
* "auto" (default): "patches" on CPU, "xla" on GPU and TPU (see `resolve_conv_impl`).

`models.conv_impls(model, sample_input)` reports what each layer resolves to on this backend.
"""

from __future__ import annotations

import jax
from flax import linen as nn
from flax.linen.linear import canonicalize_padding
from jax import lax

from sparse_robust.checks import check_choice
from sparse_robust.models.patches import conv_patches

CONV_IMPLS = ("auto", "xla", "patches")


def resolve_conv_impl(conv_impl: str = "auto", backend: str | None = None) -> str:
    """What `conv_impl` means on `backend` (default: `jax.default_backend()`): "xla" or "patches".

    "auto" is "patches" on CPU, where it measured faster for every layer of lenet-5 and conv-4
    inside PGD's loop and scanned training (XLA:CPU's convolutions lose 3-80x there), and "xla"
    on GPU and TPU.
    """
    check_choice("conv_impl", conv_impl, CONV_IMPLS)
    if conv_impl != "auto":
        return conv_impl
    return "patches" if (backend or jax.default_backend()) == "cpu" else "xla"


class Conv(nn.Conv):
    """`nn.Conv` whose convolution runs as `conv_impl` says ("auto", "xla" or "patches").

    "patches" serves 2-D convolutions with zero padding, no dilation and one feature group on an
    NHWC batch; every other configuration, and "xla", runs `nn.Conv.__call__` unchanged.
    """

    conv_impl: str = "auto"

    def __post_init__(self):
        check_choice("conv_impl", self.conv_impl, CONV_IMPLS)
        super().__post_init__()

    def resolved_impl(self, input_shape) -> str:
        """"xla" or "patches": the path a call on an input of `input_shape` takes here."""
        return resolve_conv_impl(self.conv_impl) if self._plain_2d(len(input_shape)) else "xla"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.resolved_impl(inputs.shape) == "xla":
            return super().__call__(inputs)
        # The parameters nn.Conv would create, by the same calls.
        kernel_shape = (*self._kernel_size(), inputs.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        strides = _pair(self.strides)
        padding = canonicalize_padding(self.padding, 2)
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(inputs.shape[1:3], kernel_shape[:2], strides, padding)
        y = conv_patches(inputs, kernel, strides, padding, self.precision)
        return y if bias is None else y + bias

    def _kernel_size(self) -> tuple[int, ...]:
        size = self.kernel_size
        return (size,) if isinstance(size, int) else tuple(size)

    def _plain_2d(self, input_ndim: int) -> bool:
        """Whether the patches path can run a call on an input of `input_ndim` dimensions."""
        padding = self.padding
        return (input_ndim == 4 and len(self._kernel_size()) == 2 and self.mask is None
                and self.feature_group_count == 1
                and _pair(self.input_dilation) == (1, 1) and _pair(self.kernel_dilation) == (1, 1)
                and not (isinstance(padding, str) and padding not in ("SAME", "VALID")))


def _pair(value) -> tuple[int, int]:
    """nn.Conv's int-or-sequence fields (None meaning 1) as an (H, W) pair."""
    value = 1 if value is None else value
    return (value, value) if isinstance(value, int) else tuple(value)
