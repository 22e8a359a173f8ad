"""Standard AutoAttack (Croce & Hein 2020): its plan of stages (`autoattack_stages`), the
single-program version (`autoattack_with_flags`) and, over a dataset, the stage driver in which
each stage attacks only the points still robust.

`run_stages` is the host-side driver. Before each stage it gathers the indices of the points that
every earlier stage left robust and attacks them in chunks whose sizes come from a few fixed
bucket sizes (`chunk_sizes`), so one compiled program per stage and bucket serves the whole
dataset and no new program is compiled per batch. Points already broken are never attacked
again. ``evaluation.Evaluator`` runs the stages of ``attacks.autoattack_stages`` with it.

Keys: chunk c (0-based, in the order of the still-robust indices) of stage s (0-based) is
attacked with ``fold_in(fold_in(key, s), c)``. The chunks of a stage depend on which points
earlier stages broke, so an example's key (not its result's distribution) depends on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_robust.attacks import parts
from sparse_robust.attacks.apgd import apgd, apgd_t
from sparse_robust.attacks.fab import fab_t
from sparse_robust.attacks.parts import LogitsFn
from sparse_robust.attacks.square import square
from sparse_robust.checks import check_positive_int
from sparse_robust.convention import check_logits_fn

if TYPE_CHECKING:  # The registry imports this module, so Attack is imported for types only.
    from sparse_robust.attacks.registry import Attack

StageFn = Callable[[int, np.ndarray, np.ndarray, jax.Array], jax.Array]
Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------
# The plan of stages and the single-program version

AUTOATTACK_STAGES = ("apgd_ce", "apgd_t", "fab_t", "square")
_STAGE_FNS = {"apgd": apgd, "apgd_t": apgd_t, "fab_t": fab_t, "square": square}


def _autoattack_plan(norm, num_steps, n_target_classes, num_queries, image_shape, clip_min,
                     clip_max):
    """(stage, attack name, settings but eps) of the standard version, in order, with the
    reference's settings: one restart, 100 steps, 9 targets, and Square with p_init 0.8 and
    5000 queries on the schedule of 10,000 (AutoAttack does not rescale it)."""
    box = dict(norm=norm, clip_min=clip_min, clip_max=clip_max)
    targeted = dict(num_steps=num_steps, n_target_classes=n_target_classes, **box)
    return (("apgd_ce", "apgd", dict(num_steps=num_steps, loss="ce", **box)),
            ("apgd_t", "apgd_t", targeted),
            ("fab_t", "fab_t", targeted),
            ("square", "square", dict(num_queries=num_queries, p_init=0.8, rescale_schedule=False,
                                      image_shape=image_shape, **box)))


def autoattack_stages(eps: float, norm: str = "linf", *, num_steps: int = 100,
                      n_target_classes: int = 9, num_queries: int = 5000,
                      image_shape: Optional[tuple[int, int, int]] = None, clip_min: float = 0.0,
                      clip_max: float = 1.0) -> dict[str, Attack]:
    """The stages of standard AutoAttack as `Attack`s, in order: {"apgd_ce", "apgd_t", "fab_t",
    "square"}. Each is a static jit argument, so an evaluator compiles one program per stage (see
    `run_stages`); `autoattack_with_flags` runs the same stages."""
    from sparse_robust.attacks.registry import make_attack  # The registry imports this module.
    return {stage: make_attack(name, eps=eps, **settings) for stage, name, settings in
            _autoattack_plan(norm, num_steps, n_target_classes, num_queries, image_shape,
                             clip_min, clip_max)}


def autoattack_with_flags(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *,
                          eps, norm: str = "linf", num_steps: int = 100, n_target_classes: int = 9,
                          num_queries: int = 5000, image_shape: Optional[tuple[int, int, int]] = None,
                          clip_min: float = 0.0, clip_max: float = 1.0):
    """Standard AutoAttack on one batch: APGD-CE, APGD-T, FAB-T, then Square (`autoattack_stages`),
    stage i with ``fold_in(key, i)``.

    Returns (x_adv, flags). flags maps "clean" and each stage name to bool [B]: correctly
    classified on clean data and at the adversarial point of every stage so far (so an example
    robust after a stage is robust under each earlier one). x_adv holds per example the point
    of the first stage that broke it, else x, so ``argmax(logits_fn(x_adv)) == y`` is exactly
    flags["square"]. Every stage runs on the whole batch (shapes are static); to skip examples
    already broken, run the stages with `run_stages`.
    """
    settings = dict(eps=eps, norm=norm, num_steps=num_steps, n_target_classes=n_target_classes,
                    num_queries=num_queries, image_shape=image_shape, clip_min=clip_min,
                    clip_max=clip_max)
    parts.check_settings("autoattack", settings)
    x, y = jnp.asarray(x), jnp.asarray(y)
    parts.check_inputs(x, y, key, True, clip_min, clip_max)
    check_logits_fn(logits_fn, x)

    def correct(z):
        return jnp.argmax(logits_fn(z), axis=-1) == y

    robust = correct(x)
    flags, x_adv = {"clean": robust}, x
    plan = _autoattack_plan(norm, num_steps, n_target_classes, num_queries, image_shape,
                            clip_min, clip_max)
    for index, (stage, name, stage_settings) in enumerate(plan):
        candidate = _STAGE_FNS[name](logits_fn, x, y, jax.random.fold_in(key, index), eps=eps,
                                      **stage_settings)
        still_correct = correct(candidate)
        x_adv = jnp.where(parts.expand(robust & ~still_correct, x), candidate, x_adv)
        robust = robust & still_correct
        flags[stage] = robust
    return lax.stop_gradient(x_adv), flags


def autoattack(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *, eps,
               norm: str = "linf", num_steps: int = 100, n_target_classes: int = 9,
               num_queries: int = 5000, image_shape: Optional[tuple[int, int, int]] = None,
               clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Standard AutoAttack as an attack: the x_adv of `autoattack_with_flags`."""
    return autoattack_with_flags(
        logits_fn, x, y, key, eps=eps, norm=norm, num_steps=num_steps,
        n_target_classes=n_target_classes, num_queries=num_queries, image_shape=image_shape,
        clip_min=clip_min, clip_max=clip_max)[0]


# --------------------------------------------------------------------------------------------
# The stage driver over a dataset


def default_bucket_sizes(batch_size: int) -> tuple[int, ...]:
    """batch_size and its halvings down to a sixteenth: at most 2× padding on a last chunk of at
    least batch_size / 16 rows, and at most 5 programs per stage."""
    return tuple(sorted({max(1, batch_size >> k) for k in range(5)}))


def chunk_sizes(count: int, buckets: Sequence[int]) -> list[tuple[int, int]]:
    """(bucket size, real rows) of the chunks that attack `count` points: the largest bucket that
    the remaining points fill, repeatedly, then the rest padded to the smallest bucket. At most
    smallest bucket − 1 padding rows, which keeps the compute close to `count` rows (a single
    chunk padded to the next bucket could nearly double it)."""
    buckets = sorted(buckets)
    chunks = []
    while count >= buckets[0]:
        size = max(b for b in buckets if b <= count)
        chunks.append((size, size))
        count -= size
    if count:
        chunks.append((buckets[0], count))
    return chunks


def _buckets(batch_size: int, bucket_sizes) -> list[int]:
    if bucket_sizes is None:
        return list(default_bucket_sizes(batch_size))
    sizes = list(bucket_sizes)
    for size in sizes:
        check_positive_int("bucket_sizes entry", size)
        if size > batch_size:
            raise ValueError(f"bucket_sizes={bucket_sizes!r} is invalid; allowed values: integers "
                             f"from 1 to batch_size={batch_size}.")
    return sorted(set(sizes) | {batch_size})


def run_stages(stage_fn: StageFn, images, labels, robust, key, *, stages: Sequence[str],
               batch_size: int, bucket_sizes: Optional[Sequence[int]] = None,
               progress: Optional[Progress] = None) -> dict[str, np.ndarray]:
    """Runs attack stages over a dataset, each on the points still robust, and returns
    ``{stage name: bool [N]}``: robust after that stage and every earlier one.

    Args:
      stage_fn: ``stage_fn(stage_index, x, y, key) -> bool [B]`` runs stage `stage_index` on one
        batch of B rows (B a bucket size, see `chunk_sizes`) and says per row whether the model
        still classifies it correctly at the adversarial point. Padding rows repeat the first
        real row of the same chunk.
      images, labels: the dataset, [N, ...] and [N].
      robust: bool [N], the points robust before the first stage (e.g. correct on clean data).
      key: a jax.random key; chunk c of stage s uses ``fold_in(fold_in(key, s), c)``.
      stages: the stage names, in order (distinct).
      batch_size: the largest chunk.
      bucket_sizes: the chunk sizes (each in [1, batch_size]; batch_size is always one); default
        `default_bucket_sizes(batch_size)`.
      progress: called after every chunk as ``progress(stage name, points done, points the
        stage attacks)``.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    robust = np.array(robust, dtype=bool)  # A copy: updated in place below.
    if images.ndim < 1 or labels.shape != images.shape[:1] or robust.shape != labels.shape:
        raise ValueError(f"images [N, ...], labels [N] and robust [N] must share N; got "
                         f"{images.shape}, {labels.shape}, {robust.shape}.")
    check_positive_int("batch_size", batch_size)
    stages = tuple(stages)
    if not stages or len(set(stages)) != len(stages) or not all(isinstance(s, str) for s in stages):
        raise ValueError(f"stages={stages!r} is invalid; allowed values: a non-empty sequence of "
                         "distinct names.")
    buckets = _buckets(batch_size, bucket_sizes)

    results = {}
    for stage_index, stage in enumerate(stages):
        indices = np.flatnonzero(robust)
        stage_key = jax.random.fold_in(key, stage_index)
        start = 0
        for chunk_index, (size, real) in enumerate(chunk_sizes(len(indices), buckets)):
            chunk = indices[start:start + real]
            start += real
            rows = np.concatenate([chunk, np.repeat(chunk[:1], size - real)])
            still_robust = np.asarray(stage_fn(stage_index, images[rows], labels[rows],
                                               jax.random.fold_in(stage_key, chunk_index)))
            if still_robust.shape != (size,):
                raise ValueError(f"stage_fn returned shape {still_robust.shape} for a batch of "
                                 f"{size} rows of stage {stage!r}; expected ({size},).")
            robust[chunk] = still_robust[:real].astype(bool)
            if progress is not None:
                progress(stage, start, len(indices))
        results[stage] = robust.copy()
    return results
