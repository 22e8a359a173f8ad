"""Tiny models and an FGSM attack shared by the core tests (defined here so the tests do not
depend on ``sparse_robust.models`` / ``sparse_robust.attacks``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import objectives


class TinyMLP(nn.Module):
    """784->300->100->10 in miniature: dense_0, dense_1, output; ReLU."""

    hidden: tuple = (6, 5)
    num_classes: int = 3
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, use_bias=self.use_bias, name=f"dense_{i}")(x))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="output")(x)


class TinyConvBN(nn.Module):
    """BatchNorm on the input (so its running mean has a simple reference), conv, BN, dense."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        x = bn("input_norm")(x)
        x = nn.Conv(4, (3, 3), name="conv_0")(x)
        x = nn.relu(bn("norm_0")(x))
        return nn.Dense(self.num_classes, name="output")(jnp.mean(x, axis=(1, 2)))


def numpy_init(model, sample_input, seed):
    """Variables of ``model`` with numpy random values.

    Only the shapes come from flax (``eval_shape`` traces without compiling): an eager
    ``model.init`` compiles every initialiser op and costs seconds of CPU per model.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample_input, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_fgsm(eps: float, random_start: bool = False):
    """attack(logits_fn, x, y, key): one signed-gradient step of size eps, clipped to [0, 1]."""

    def attack(logits_fn, x, y, key):
        if random_start:
            x = jnp.clip(x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps), 0.0, 1.0)
        loss = lambda z: jnp.mean(objectives.cross_entropy(logits_fn(z), y))
        return jnp.clip(x + eps * jnp.sign(jax.grad(loss)(x)), 0.0, 1.0)

    return attack


# Fixtures hand out the helpers above (tests/ is not a package, so tests do not import it).
@pytest.fixture(scope="session", name="make_fgsm")
def _make_fgsm():
    return make_fgsm


@pytest.fixture(scope="session", name="numpy_init")
def _numpy_init():
    return numpy_init


@pytest.fixture(scope="session")
def tiny_mlp():
    return TinyMLP


@pytest.fixture(scope="session")
def tiny_conv_bn():
    return TinyConvBN
