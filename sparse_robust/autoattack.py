"""AutoAttack over a dataset: each stage attacks only the points still robust.

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

from typing import Callable, Optional, Sequence

import jax
import numpy as np

from sparse_robust.checks import check_positive_int

StageFn = Callable[[int, np.ndarray, np.ndarray, jax.Array], jax.Array]
Progress = Callable[[str, int, int], None]


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
