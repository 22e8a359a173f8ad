"""Shared pieces of every classifier: common fields, width scaling and input checks."""

import functools
import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_robust.checks import check_choice, check_positive_int
from sparse_robust.models.conv import CONV_IMPLS, Conv


def linear_layer_calls(model: nn.Module, sample_input) -> list[tuple[str, nn.Module, tuple]]:
    """(module path "a/b", module, input shape) of every nn.Dense / nn.Conv call of `model` on
    `sample_input`, in call order. Shapes only: nothing is computed."""
    calls, running = [], []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        # A subclass whose __call__ runs nn.Conv's through super() makes one call, not two.
        if (context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv))
                and not (running and running[-1] is module)):
            calls.append(("/".join(module.path), module, tuple(args[0].shape)))
        running.append(module)
        try:
            return next_fun(*args, **kwargs)
        finally:
            running.pop()

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                       jnp.asarray(sample_input))
    return calls


def conv_impls(model: nn.Module, sample_input) -> dict[str, str]:
    """{conv layer path: "xla", "patches", "winograd", "winograd_cpu" or "direct_cpu"}: how each
    convolution of `model` runs on `sample_input` on the default backend (see `sparse_robust.models.conv`).
    Shapes only."""
    return {path: module.resolved_impl(shape) if isinstance(module, Conv) else "xla"
            for path, module, shape in linear_layer_calls(model, sample_input)
            if isinstance(module, nn.Conv)}


class Classifier(nn.Module):
    """Base of all models: `num_classes` outputs, hidden widths scaled by `width_multiplier`, and
    `conv_impl` ("auto", "xla", "patches", "winograd", "winograd_cpu" or "direct_cpu", see
    `sparse_robust.models.conv`) for the convolutions of models that have some.

    Subclasses implement `__call__(self, x, train: bool = False) -> logits` and name their final
    `nn.Dense` layer `output` (pruning schedules address it by that name).
    """

    num_classes: int = 10
    width_multiplier: float = 1.0
    conv_impl: str = "auto"

    def __post_init__(self):
        # Validate at construction so a bad value fails before any parameter is created.
        check_positive_int("num_classes", self.num_classes)
        check_choice("conv_impl", self.conv_impl, CONV_IMPLS)
        multiplier = self.width_multiplier
        is_number = isinstance(multiplier, numbers.Real) and not isinstance(multiplier, bool)
        if not (is_number and multiplier > 0):
            raise ValueError(f"width_multiplier must be a number > 0, got {multiplier!r}.")
        super().__post_init__()

    def scaled(self, width: int) -> int:
        """A hidden width scaled by `width_multiplier`, rounded, and at least 1."""
        return max(1, round(width * self.width_multiplier))


def flatten_batch(x: jnp.ndarray) -> jnp.ndarray:
    """Flattens every axis but the batch axis: (N, ...) -> (N, D)."""
    if x.ndim < 2:
        raise ValueError(f"Expected a batch of shape (N, D) or (N, H, W, C), got shape {x.shape}.")
    return x.reshape(x.shape[0], -1)


def require_images(x: jnp.ndarray, model: str) -> None:
    """Raises ValueError unless `x` is an NHWC image batch (conv nets cannot use flat inputs)."""
    if x.ndim != 4:
        raise ValueError(
            f"{model} needs NHWC images of shape (N, H, W, C), got an input of shape {x.shape}; "
            "if the data is flattened, set data.flatten=False."
        )


# Conv layers followed by batch norm (VGG, ResNets): no bias, He-normal kernels.
conv_before_bn = functools.partial(Conv, use_bias=False, kernel_init=nn.initializers.he_normal())


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """Batch norm used by every model: batch statistics when training, running averages otherwise."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
