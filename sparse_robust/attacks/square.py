"""The Square attack (Andriushchenko et al. 2020), L∞ and L2: a score-based random search that
never evaluates a gradient, so gradient masking cannot stop it.

Each query proposes to change one random square window of the image and keeps the change when it
lowers the margin z_y − max_{i≠y} z_i. The window covers a fraction p(t) of the pixels that
shrinks with the iteration t (`square_schedule`). Inputs are viewed as images [H, W, C]: a batch
[B, H, W, C] as it is, [B, H, W] with one channel, and a flat batch [B, D] as √D×√D×1 unless
``image_shape`` is given. Query t draws from ``fold_in(key, t)``: under L∞ one window for the
whole batch, as the reference does, and a sign per example and channel; under L2 both windows per
example.

One window per query lets L∞ Square on a network whose first layer is dense on the flattened
input (`dense_prefix`: an MLP) update that layer's output by the s² changed rows of its kernel
instead of recomputing it, with the window's side bounded statically in each of a few groups of
the schedule. The proposals are the same either way; margins differ by float rounding only (the
first layer's output is recomputed from x at the start of each group, so rounding does not
accumulate).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_robust.attacks import parts
from sparse_robust.attacks.dense_prefix import DensePrefix, dense_prefix
from sparse_robust.attacks.parts import LogitsFn
from sparse_robust.losses import margin_parts

# Iterations (of a 10,000-query budget) after which the square's area fraction p is halved.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_MIN_L2_SIDE = 5  # The L2 start tiles the image with 5×5 blocks of windows of side H // 5 >= 1.


def square_schedule(num_queries: int, p_init: float = 0.8, rescale_schedule: bool = True) -> np.ndarray:
    """p(t) for t = 0 … num_queries − 1: p_init halved after each of 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000 iterations. With `rescale_schedule` (the paper, and the reference's
    default) t is first mapped to int(t / num_queries · 10000), so the halvings fall at the same
    fractions of any budget; AutoAttack runs its 5000 queries without rescaling."""
    t = np.arange(num_queries)
    if rescale_schedule:
        t = (t / num_queries * 10000).astype(np.int64)  # The reference's float arithmetic.
    return p_init / 2.0 ** np.sum(t[:, None] > np.array(_HALVINGS), axis=1)


def _side_lengths(schedule: np.ndarray, norm: str, height: int, width: int) -> np.ndarray:
    """Window side per iteration: round(√(p·H·W)) (the area fraction p of the pixels), at least 1
    (L∞) or at least 3 and odd (L2), at most min(H, W), as the reference computes it."""
    sides = []
    for p in schedule:
        side = int(round(math.sqrt(p * height * width)))
        if norm == "l2":
            side = max(side, 3)
            side += 1 - side % 2
        sides.append(min(max(side, 1), height, width))
    return np.asarray(sides, np.int32)


def _image_shape(x_shape, image_shape) -> tuple[int, int, int]:
    features = math.prod(x_shape[1:])
    if image_shape is None:
        if len(x_shape) == 4:
            return tuple(x_shape[1:])
        if len(x_shape) == 3:
            return (*x_shape[1:], 1)
        side = math.isqrt(features)
        if len(x_shape) == 2 and side * side == features:
            return side, side, 1
    elif math.prod(image_shape) == features:
        return image_shape
    raise ValueError(f"image_shape={image_shape!r} is invalid for inputs of shape {tuple(x_shape)}; "
                     "allowed values: None for [B, H, W, C], [B, H, W] or square flat inputs, or "
                     f"(height, width, channels) with {features} features in all.")


def _window(corner_h, corner_w, side, height: int, width: int):
    """[B, H, W, 1] masks of the squares of `side` with top-left corners (corner_h, corner_w)."""
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= corner_h[:, None]) & (rows < corner_h[:, None] + side)
    in_cols = (cols >= corner_w[:, None]) & (cols < corner_w[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :])[..., None]


def _random_corners(key, side, batch: int, height: int, width: int):
    """Top-left corners uniform in [0, H − s) × [0, W − s) (0 where s fills the side): the
    reference's floor(u·(H − s)), which never places a window on the last row or column."""
    k_h, k_w = jax.random.split(key)
    corner_h = jnp.floor(jax.random.uniform(k_h, (batch,)) * (height - side)).astype(jnp.int32)
    corner_w = jnp.floor(jax.random.uniform(k_w, (batch,)) * (width - side)).astype(jnp.int32)
    return corner_h, corner_w


def _random_signs(key, shape, dtype):
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(dtype)


def _rectangles(rows: int, cols: int) -> np.ndarray:
    """The reference's L2 window half: nested rectangles around the centre, ring k (Chebyshev
    distance k from the centre) adding 1/(k + 1)² to every cell within it; unit L2 norm."""
    distance = np.maximum(np.abs(np.arange(rows)[:, None] - rows // 2),
                          np.abs(np.arange(cols)[None, :] - cols // 2))
    rings = max(rows // 2, cols // 2) + 1
    weights = np.cumsum((1.0 / np.arange(1, rings + 1) ** 2)[::-1])[::-1]  # Σ_{k>=m} 1/(k+1)².
    pattern = weights[distance]
    return pattern / np.sqrt(np.sum(pattern ** 2))


def _l2_pattern(side: int) -> np.ndarray:
    """The L2 window perturbation of `side` (unit L2 norm): positive rectangles on the top half,
    negative on the bottom half."""
    pattern = np.concatenate([_rectangles(side // 2, side), -_rectangles(side - side // 2, side)])
    return pattern / np.sqrt(np.sum(pattern ** 2))


def _place_patterns(patterns, index, corner_h, corner_w, transpose, height: int, width: int):
    """[B, H, W, 1]: pattern `index` (of a stack [P, S, S], zero outside its side) with its
    top-left corner at (corner_h, corner_w), transposed where `transpose`; zero elsewhere."""
    size = patterns.shape[-1]
    rel_h = jnp.arange(height)[None, :, None] - corner_h[:, None, None]
    rel_w = jnp.arange(width)[None, None, :] - corner_w[:, None, None]
    rel_h, rel_w = (jnp.where(transpose[:, None, None], rel_w, rel_h),
                    jnp.where(transpose[:, None, None], rel_h, rel_w))
    inside = (rel_h >= 0) & (rel_h < size) & (rel_w >= 0) & (rel_w < size)
    values = patterns[index][jnp.clip(rel_h, 0, size - 1), jnp.clip(rel_w, 0, size - 1)]
    return jnp.where(inside, values, 0.0)[..., None]


def _l2_sum(v, axes):
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def square(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *, eps,
           num_queries: int = 5000, norm: str = "linf", p_init: float = 0.8,
           rescale_schedule: bool = True, image_shape: Optional[tuple[int, int, int]] = None,
           clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Square attack on the margin loss, with `num_queries` queries after the start.

    L∞: starts from vertical stripes x ± ε (a random sign per column and channel); each query
    sets one window of side √(p(t)·H·W) to x ± ε (a random sign per channel). L2: starts from a
    5×5 grid of windows of the L2 pattern (`_l2_pattern`) with random signs, scaled to norm ε;
    each query moves the perturbation mass of a second window into the first one, reshaped to the
    pattern, keeping the norm ε. A proposal is kept when it lowers the margin or misclassifies.
    An example stops once misclassified; the loop ends when all have (or after num_queries).
    Returns per example the lowest-margin point (misclassified where the attack succeeded).
    """
    parts.check_settings("square", dict(eps=eps, num_queries=num_queries, norm=norm, p_init=p_init,
                                        rescale_schedule=rescale_schedule, image_shape=image_shape,
                                        clip_min=clip_min, clip_max=clip_max))
    x, y = jnp.asarray(x), jnp.asarray(y)
    parts.check_inputs(x, y, key, True, clip_min, clip_max)
    height, width, channels = _image_shape(x.shape, image_shape)
    if norm == "l2" and min(height, width) < _MIN_L2_SIDE:
        raise ValueError(f"image_shape={(height, width, channels)} is invalid for the L2 Square "
                         f"attack; allowed values: height and width >= {_MIN_L2_SIDE}.")
    parts.num_classes_at_least(logits_fn, x, 2, "Square (margin loss)")
    eps = parts.as_float(eps, x)
    batch = x.shape[0]
    clean = x.reshape(batch, height, width, channels)
    sides = _side_lengths(square_schedule(num_queries, p_init, rescale_schedule), norm, height, width)

    def margin(z):
        true_logit, other_logit = margin_parts(logits_fn(z.reshape(x.shape)), y)
        return true_logit - other_logit

    init_key, loop_key = jax.random.split(key)
    if norm == "linf":
        stripes = _random_signs(init_key, (batch, 1, width, channels), x.dtype)
        start = jnp.clip(clean + eps * stripes, clip_min, clip_max)
        prefix = dense_prefix(logits_fn, x)
        if prefix is not None:
            x_best = _linf_incremental(prefix, y, clean, start, loop_key, eps, sides, clip_min,
                                       clip_max)
            return lax.stop_gradient(x_best.reshape(x.shape))
        propose = _linf_proposal(clean, eps, sides, clip_min, clip_max)
    else:
        start = _l2_start(init_key, clean, eps, clip_min, clip_max)
        propose = _l2_proposal(clean, eps, sides, clip_min, clip_max)

    def query(state):
        t, x_best, margin_best = state
        x_new = propose(jax.random.fold_in(loop_key, t), t, x_best)
        margin_new = margin(x_new)
        # Lower margins are better; misclassified examples (margin <= 0) are left alone.
        take = (margin_best > 0) & (margin_new < margin_best)
        return (t + 1, jnp.where(take[:, None, None, None], x_new, x_best),
                jnp.where(take, margin_new, margin_best))

    _, x_best, _ = lax.while_loop(lambda s: (s[0] < num_queries) & jnp.any(s[2] > 0), query,
                                  (0, start, margin(start)))
    return lax.stop_gradient(x_best.reshape(x.shape))


def _linf_draw(key, side, batch: int, height: int, width: int, channels: int, dtype):
    """Query's window corner (one for the batch) and signs (one per example and channel)."""
    k_corner, k_sign = jax.random.split(key)
    corner_h, corner_w = _random_corners(k_corner, side, 1, height, width)
    return corner_h[0], corner_w[0], _random_signs(k_sign, (batch, 1, 1, channels), dtype)


def _linf_proposal(clean, eps, sides, clip_min, clip_max):
    batch, height, width, channels = clean.shape
    sides = jnp.asarray(sides)

    def propose(key, t, x_best):
        side = sides[t]
        corner_h, corner_w, signs = _linf_draw(key, side, batch, height, width, channels,
                                               clean.dtype)
        window = _window(corner_h[None], corner_w[None], side, height, width)
        # The reference adds 2ε·sign and projects; from a point of the ball that is x + ε·sign.
        return jnp.where(window, jnp.clip(clean + eps * signs, clip_min, clip_max), x_best)

    return propose


def _phase_groups(sides: np.ndarray) -> list[tuple[int, int, int]]:
    """(largest side, first query, end) of runs of queries whose sides stay within a factor 2 of
    the run's smallest: one loop each, with windows of its largest side masked to the query's
    (AutoAttack's schedule on 28×28 images: sides 25-13, 9-6 and 4-2, three loops, not eight)."""
    groups = []
    for t, side in enumerate(sides.tolist()):
        if groups and max(groups[-1][0], side) <= 2 * min(groups[-1][3], side):
            largest, first, _, smallest = groups[-1]
            groups[-1] = (max(largest, side), first, t + 1, min(smallest, side))
        else:
            groups.append((side, t, t + 1, side))
    return [(largest, first, end) for largest, first, end, _ in groups]


def _linf_incremental(prefix: DensePrefix, y, clean, start, loop_key, eps, sides, clip_min,
                      clip_max):
    """L∞ Square's query loop on a network ``rest(flat(x) @ kernel + bias)``: each query changes
    one s×s window, so the first layer's output changes by (new − old window) @ the window's s²·C
    kernel rows. Same proposals and acceptance as the `_linf_proposal` loop.

    The window is sliced at its group's largest side S (static, `_phase_groups`) and masked to
    the query's side; images and kernel are zero-padded by S − 1 so that slice stays in bounds."""
    batch, height, width, channels = clean.shape
    groups = _phase_groups(sides)
    pad = max(largest for largest, _, _ in groups) - 1
    padding = ((0, pad), (0, pad), (0, 0))
    kernel = jnp.pad(prefix.kernel.reshape(height, width, channels, -1), (*padding, (0, 0)))
    clean_padded = jnp.pad(clean, ((0, 0), *padding))
    sides = jnp.asarray(sides)

    def margin(h):
        true_logit, other_logit = margin_parts(prefix.rest(h), y)
        return true_logit - other_logit

    def group(state, size, end):
        def query(state):
            t, x_best, h_best, margin_best = state
            side = sides[t]
            corner_h, corner_w, signs = _linf_draw(jax.random.fold_in(loop_key, t), side, batch,
                                                   height, width, channels, clean.dtype)
            corner = (0, corner_h, corner_w, 0)
            old = lax.dynamic_slice(x_best, corner, (batch, size, size, channels))
            inside = jnp.arange(size) < side
            window = (inside[:, None] & inside[None, :])[..., None]  # [S, S, 1]
            new = jnp.where(window, jnp.clip(lax.dynamic_slice(clean_padded, corner, old.shape)
                                             + eps * signs, clip_min, clip_max), old)
            rows = lax.dynamic_slice(kernel, (corner_h, corner_w, 0, 0),
                                     (size, size, channels, kernel.shape[-1]))
            h_new = h_best + (new - old).reshape(batch, -1) @ rows.reshape(-1, kernel.shape[-1])
            margin_new = margin(h_new)
            take = (margin_best > 0) & (margin_new < margin_best)
            x_best = lax.dynamic_update_slice(
                x_best, jnp.where(take[:, None, None, None], new, old), corner)
            return (t + 1, x_best, jnp.where(take[:, None], h_new, h_best),
                    jnp.where(take, margin_new, margin_best))

        t, x_best, _, margin_best = state
        # Exact again at each group: rounding does not accumulate over the whole run.
        h_best = prefix.first(x_best[:, :height, :width])
        return lax.while_loop(lambda s: (s[0] < end) & jnp.any(s[3] > 0), query,
                              (t, x_best, h_best, margin_best))

    h_start = prefix.first(start)
    state = (0, jnp.pad(start, ((0, 0), *padding)), h_start, margin(h_start))
    for size, _, end in groups:
        state = group(state, size, end)
    return state[1][:, :height, :width]


def _l2_start(key, clean, eps, clip_min, clip_max):
    """The reference's L2 start: a grid of windows of side s = H // 5 from (o, o), o = (H − 5s) // 2,
    as many as fit (at most H // s × W // s), each the L2 pattern with a random sign per channel
    and a random transpose, then the whole perturbation scaled to norm ε."""
    batch, height, width, channels = clean.shape
    side = height // 5
    offset = (height - 5 * side) // 2
    rows = min(height // side, (height - offset) // side)
    cols = min(width // side, (width - offset) // side)
    k_sign, k_transpose = jax.random.split(key)
    pattern = jnp.asarray(_l2_pattern(side), clean.dtype)
    transpose = jax.random.bernoulli(k_transpose, 0.5, (batch, rows, cols, 1, 1))
    blocks = jnp.where(transpose, pattern.T, pattern)[..., None]  # [B, rows, cols, s, s, 1]
    blocks = blocks * _random_signs(k_sign, (batch, rows, cols, 1, 1, channels), clean.dtype)
    grid = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * side, cols * side, channels)
    delta = jnp.pad(grid, ((0, 0), (offset, height - offset - rows * side),
                           (offset, width - offset - cols * side), (0, 0)))
    delta = delta / (_l2_sum(delta, (1, 2, 3)) + parts.TINY)
    return jnp.clip(clean + eps * delta, clip_min, clip_max)


def _l2_proposal(clean, eps, sides, clip_min, clip_max):
    batch, height, width, channels = clean.shape
    distinct = sorted(set(sides.tolist()))
    size = max(distinct)
    # One zero-padded pattern per side the schedule uses, and which one each iteration uses.
    patterns = np.zeros((len(distinct), size, size), np.float32)
    for i, side in enumerate(distinct):
        patterns[i, :side, :side] = _l2_pattern(side)
    patterns = jnp.asarray(patterns, clean.dtype)
    pattern_index = jnp.asarray([distinct.index(side) for side in sides.tolist()])
    sides = jnp.asarray(sides)
    hw = (1, 2)

    def propose(key, t, x_best):
        k_first, k_second, k_sign, k_transpose = jax.random.split(key, 4)
        side = sides[t]
        corner_h, corner_w = _random_corners(k_first, side, batch, height, width)
        first = _window(corner_h, corner_w, side, height, width)
        second = _window(*_random_corners(k_second, side, batch, height, width), side, height, width)
        delta = x_best - clean
        # Per channel: the mass already in both windows plus the room left in the ε-ball is
        # what the first window may hold after the second one is cleared.
        norm_first = _l2_sum(jnp.where(first, delta, 0.0), hw)
        norm_both = _l2_sum(jnp.where(first | second, delta, 0.0), hw)
        spent = jnp.sum(jnp.square(delta), axis=(1, 2, 3), keepdims=True)
        room = jnp.maximum(jnp.square(eps) - spent, 0.0)
        transpose = jax.random.bernoulli(k_transpose, 0.5, (batch,))
        shape = _place_patterns(patterns, pattern_index[t], corner_h, corner_w, transpose, height,
                                width)
        signs = _random_signs(k_sign, (batch, 1, 1, channels), clean.dtype)
        new = shape * signs + jnp.where(first, delta, 0.0) / (norm_first + parts.TINY)
        new = new / (_l2_sum(new, hw) + parts.TINY) * jnp.sqrt(room / channels + jnp.square(norm_both))
        delta = jnp.where(first, new, jnp.where(second, 0.0, delta))
        delta = delta / (_l2_sum(delta, (1, 2, 3)) + parts.TINY)
        return jnp.clip(clean + eps * delta, clip_min, clip_max)

    return propose
