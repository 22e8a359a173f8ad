"""The models' convolution layer: `nn.Conv` with a choice of implementation, and the choice.

`Conv` is an `nn.Conv` (same fields, parameters `kernel` [kh, kw, cin, cout] and `bias` [cout],
same initialisation, same outputs up to float rounding), so masks, checkpoints, pruning,
diagnostics and inheritance see no difference. Its `conv_impl` picks how the convolution runs:

* "xla": XLA's convolution op, as `nn.Conv` runs it;
* "patches": one matrix product over patches (`sparse_robust.models.patches`);
* "winograd": Winograd's F(2x2, 3x3) in XLA ops (`sparse_robust.models.winograd`), for 3x3
  kernels with stride 1; a layer it cannot serve runs "patches" instead;
* "winograd_cpu": the same algorithm as one fused CPU kernel (`sparse_robust.models.winograd_cpu`)
  for 3x3, stride-1, SAME float32 layers with channel counts that are multiples of 16, on CPU
  where the kernel could be built; any other layer runs "winograd" instead;
* "direct_cpu": a direct convolution with 16 images in a vector's lanes, as one CPU kernel
  (`sparse_robust.models.direct_cpu`), for stride-1 float32 layers it serves, on CPU where the
  kernel could be built; any other layer runs "patches" instead;
* "auto" (default): on CPU "winograd_cpu" (else "winograd") for the 3x3 stride-1 layers with at
  least `WINOGRAD_MIN_CHANNELS` input channels, "direct_cpu" for the stride-1 layers of at most
  `DIRECT_MAX_CHANNELS` channels in and out (LeNet-5's), and "patches" for the others; "xla" on
  GPU and TPU (see `resolve_conv_impl`).

`models.conv_impls(model, sample_input)` reports what each layer resolves to on this backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.linear import canonicalize_padding
from jax import lax

from sparse_robust.checks import check_choice
from sparse_robust.models import direct_cpu, winograd_cpu
from sparse_robust.models.patches import conv_patches
from sparse_robust.models.winograd import conv_winograd, serves, transformed_kernel

CONV_IMPLS = ("auto", "xla", "patches", "winograd", "winograd_cpu", "direct_cpu")

# "auto" runs a 3x3 stride-1 layer on CPU as "winograd" from this many input channels on: below
# it, the transforms cost more than the multiplications they save.
WINOGRAD_MIN_CHANNELS = 16
# "auto" runs a layer on CPU as "direct_cpu" where neither its input nor its output has more
# channels than this: LeNet-5's layers ran 2.4-3.7x faster forward and 1.7-2.5x for the input
# gradient than "patches", a 3 -> 16 layer 6-8x; a 1 -> 64 layer's input gradient ran 2x
# slower (benchmarks/README.md).
DIRECT_MAX_CHANNELS = 16


def resolve_conv_impl(conv_impl: str = "auto", backend: str | None = None,
                      kernel_shape=None, strides=(1, 1), padding=None, dtype=jnp.float32) -> str:
    """The path a layer with HWIO `kernel_shape`, `strides`, explicit (low, high) `padding` pairs
    and `dtype` takes on `backend` (default: `jax.default_backend()`): "xla", "patches",
    "winograd", "winograd_cpu" or "direct_cpu".

    On CPU "auto" is "winograd_cpu" for the layers it serves (`winograd_cpu.serves`) when the
    kernel is available on one device, else "winograd", for 3x3 stride-1 kernels with at least
    `WINOGRAD_MIN_CHANNELS` input channels (conv-4's last three layers, measured faster inside
    PGD's loop and scanned training); "direct_cpu" on one device for the layers it serves
    (`direct_cpu.serves`) with at most `DIRECT_MAX_CHANNELS` channels in and out; and "patches"
    for the others (XLA:CPU's convolutions lose 3-80x there). On GPU and TPU it is "xla".
    "winograd_cpu" where it cannot run is "winograd"; "winograd" on a layer it cannot serve (or
    of unknown `kernel_shape`) is "patches", and so is "direct_cpu" where it cannot run.
    """
    check_choice("conv_impl", conv_impl, CONV_IMPLS)
    backend = backend or jax.default_backend()
    winograd = kernel_shape is not None and serves(kernel_shape, strides)
    if conv_impl == "auto":
        if backend != "cpu":
            return "xla"
        winograd = winograd and kernel_shape[2] >= WINOGRAD_MIN_CHANNELS
        # Across devices XLA's partitioner cannot split an FFI call by batch; it would gather.
        one_device = jax.device_count() == 1
        if (not winograd and one_device and kernel_shape is not None
                and max(kernel_shape[2:]) <= DIRECT_MAX_CHANNELS):
            conv_impl = "direct_cpu"
        else:
            conv_impl = "winograd_cpu" if one_device else "winograd"
    if conv_impl == "direct_cpu":
        direct = (backend == "cpu" and kernel_shape is not None and padding is not None
                  and direct_cpu.serves(kernel_shape, strides, padding, dtype)
                  and direct_cpu.available())
        return "direct_cpu" if direct else "patches"
    if conv_impl == "winograd_cpu":
        fused = (backend == "cpu" and winograd and padding is not None
                 and winograd_cpu.serves(kernel_shape, strides, padding, dtype)
                 and winograd_cpu.available())
        conv_impl = "winograd_cpu" if fused else "winograd"
    return "patches" if conv_impl == "winograd" and not winograd else conv_impl


class Conv(nn.Conv):
    """`nn.Conv` whose convolution runs as `conv_impl` says ("auto", "xla", "patches", "winograd",
    "winograd_cpu" or "direct_cpu", see `resolve_conv_impl`).

    "patches", "winograd" and "direct_cpu" serve 2-D convolutions with zero padding, no dilation
    and one feature group on an NHWC batch ("winograd" 3x3 kernels with stride 1 only,
    "direct_cpu" the layers `direct_cpu.serves`; others run "patches"); every other
    configuration, and "xla", runs `nn.Conv.__call__` unchanged.
    """

    conv_impl: str = "auto"

    def __post_init__(self):
        check_choice("conv_impl", self.conv_impl, CONV_IMPLS)
        super().__post_init__()

    def resolved_impl(self, input_shape) -> str:
        """"xla", "patches", "winograd", "winograd_cpu" or "direct_cpu": the path a call on an
        input of `input_shape` takes."""
        if not self._plain_2d(len(input_shape)):
            return "xla"
        strides = _pair(self.strides)
        return resolve_conv_impl(self.conv_impl, kernel_shape=self._kernel_shape(input_shape),
                                 strides=strides, padding=self._pads(input_shape, strides),
                                 dtype=self.dtype or self.param_dtype)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        impl = self.resolved_impl(inputs.shape)
        if impl == "xla":
            return super().__call__(inputs)
        # The parameters nn.Conv would create, by the same calls.
        kernel_shape = self._kernel_shape(inputs.shape)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        strides = _pair(self.strides)
        padding = self._pads(inputs.shape, strides)
        if impl == "winograd_cpu" and inputs.dtype == jnp.float32:
            y = winograd_cpu.conv3x3(inputs, transformed_kernel(kernel))
        elif impl == "direct_cpu" and inputs.dtype == jnp.float32:
            y = direct_cpu.conv(inputs, kernel, padding)
        else:
            conv = conv_winograd if impl in ("winograd", "winograd_cpu") else conv_patches
            y = conv(inputs, kernel, strides, padding, self.precision)
        return y if bias is None else y + bias

    def _pads(self, input_shape, strides) -> tuple[tuple[int, int], ...]:
        """Explicit (low, high) padding pairs for H and W."""
        padding = canonicalize_padding(self.padding, 2)
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(input_shape[1:3], self._kernel_size(), strides, padding)
        return tuple(map(tuple, padding))

    def _kernel_shape(self, input_shape) -> tuple[int, ...]:
        return (*self._kernel_size(), input_shape[-1], self.features)

    def _kernel_size(self) -> tuple[int, ...]:
        size = self.kernel_size
        return (size,) if isinstance(size, int) else tuple(size)

    def _plain_2d(self, input_ndim: int) -> bool:
        """Whether the patches (and winograd) paths can run a call on an input of `input_ndim`
        dimensions."""
        padding = self.padding
        return (input_ndim == 4 and len(self._kernel_size()) == 2 and self.mask is None
                and self.feature_group_count == 1
                and _pair(self.input_dilation) == (1, 1) and _pair(self.kernel_dilation) == (1, 1)
                and not (isinstance(padding, str) and padding not in ("SAME", "VALID")))


def _pair(value) -> tuple[int, int]:
    """nn.Conv's int-or-sequence fields (None meaning 1) as an (H, W) pair."""
    value = 1 if value is None else value
    return (value, value) if isinstance(value, int) else tuple(value)
