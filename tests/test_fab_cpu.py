"""FAB's projection kernel (`attacks.fab_cpu`) against the XLA-ops form it replaces
(`fab.project_to_hyperplane_in_box`) and against the definition: on the hyperplane, in the box."""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import attacks
from sparse_robust.attacks import fab, fab_cpu

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the kernel is built for Linux on x86-64 only")

# (rows, D): widths below, at and past a 16-float vector and not a multiple of it, one coordinate,
# and an image row.
SHAPES = [(9, 13), (4, 16), (6, 47), (3, 1), (40, 784)]


def case(rows, dim, seed, scale=3.0):
    """Points in [0, 1] (some on the bounds), normals with zero entries, offsets that the box
    reaches or misses."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, (rows, dim))
    points[:, ::5] = np.round(points[:, ::5])  # on a bound
    w = rng.standard_normal((rows, dim))
    w[:, 1::7] = 0.0
    b = np.sum(w * points, axis=1) + rng.standard_normal(rows) * scale
    b[0] = np.sum(w[0] * points[0])  # already on the hyperplane
    return tuple(jnp.asarray(a, jnp.float32) for a in (points, w, b))


def test_the_kernel_is_built_here():
    assert fab_cpu.available(), fab_cpu._load()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("rows, dim", SHAPES)
def test_the_kernel_equals_the_xla_form(norm, rows, dim):
    points, w, b = case(rows, dim, seed=rows * dim)
    expected = jax.jit(fab.project_to_hyperplane_in_box, static_argnums=3)(points, w, b, norm)
    got = jax.jit(fab_cpu.project, static_argnums=3)(points, w, b, norm)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_step_lands_on_the_hyperplane_inside_the_box(norm):
    points, w, b = case(64, 100, seed=1, scale=0.5)
    d = np.asarray(fab_cpu.project(points, w, b, norm, -0.5, 1.5))
    moved = np.asarray(points) + d
    assert np.all(moved >= -0.5 - 1e-6) and np.all(moved <= 1.5 + 1e-6)
    reach = np.sum(np.abs(w) * np.maximum(1.5 - points, points + 0.5), axis=1)
    meets = reach > np.abs(np.sum(w * points, axis=1) - b) + 1e-3  # the box reaches the plane
    assert meets.sum() > 50
    residual = np.sum(np.asarray(w) * moved, axis=1) - np.asarray(b)
    np.testing.assert_allclose(residual[meets], 0.0, atol=2e-3)


def test_a_missed_hyperplane_sends_every_coordinate_to_its_nearer_bound():
    points = jnp.full((1, 5), 0.5)
    w = jnp.asarray([[1.0, -2.0, 0.0, 3.0, 0.5]])
    d = fab_cpu.project(points, w, jnp.asarray([100.0]), "linf")  # w.(p + d) = 100: unreachable
    np.testing.assert_allclose(d, [[0.5, -0.5, 0.0, 0.5, 0.5]])


def test_vmap_runs_the_mapped_axis_as_more_rows():
    points, w, b = case(12, 30, seed=2)
    stacked = [a.reshape((3, 4) + a.shape[1:]) for a in (points, w, b)]
    mapped = jax.vmap(lambda p, v, c: fab_cpu.project(p, v, c, "linf"))(*stacked)
    np.testing.assert_array_equal(mapped.reshape(12, 30), fab_cpu.project(points, w, b, "linf"))


def test_other_dtypes_run_the_xla_form_and_gradients_stop():
    points, w, b = (a.astype(jnp.float16) for a in case(5, 20, seed=3))
    np.testing.assert_array_equal(fab_cpu.project(points, w, b, "l2"),
                                  fab.project_to_hyperplane_in_box(points, w, b, "l2"))
    points, w, b = case(5, 20, seed=3)
    grad = jax.grad(lambda p: jnp.sum(fab_cpu.project(p, w, b, "linf")))(points)
    assert not np.any(grad)  # FAB never differentiates through its projection


def test_fab_t_gives_the_same_verdicts_with_the_kernel(monkeypatch):
    rng = np.random.default_rng(4)
    kernel = jnp.asarray(rng.standard_normal((30, 5)), jnp.float32)
    logits_fn = lambda z: jnp.tanh(z @ kernel) @ kernel.T[:, :5]  # noqa: E731
    x = jnp.asarray(rng.uniform(0, 1, (32, 30)), jnp.float32)
    y = jnp.argmax(logits_fn(x), axis=-1)
    run = lambda: attacks.fab_t(logits_fn, x, y, None, eps=0.1, num_steps=20,  # noqa: E731
                                n_target_classes=3)
    assert fab._projection() is fab_cpu.project
    with_kernel = run()
    monkeypatch.setattr(fab, "_projection", lambda: fab.project_to_hyperplane_in_box)
    without = run()
    broken = jnp.argmax(logits_fn(with_kernel), -1) != y
    assert 0 < int(broken.sum()) < 32
    np.testing.assert_array_equal(broken, jnp.argmax(logits_fn(without), -1) != y)
    np.testing.assert_allclose(with_kernel, without, atol=1e-4)
