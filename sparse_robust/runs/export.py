"""A finished unit of a workdir as a PyTorch state dict (see `sparse_robust.interop`)."""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from sparse_robust import interop
from sparse_robust import masks as masks_lib
from sparse_robust import models as models_lib
from sparse_robust.runs import store
from sparse_robust.runs.errors import WorkdirError
from sparse_robust.runs.layout import Layout


def _unit_label(trial: int, level: int, branch: Optional[str]) -> str:
    label = f"trial {trial} level {level}"
    return label if branch is None else f"{label} branch {branch!r}"


def _known_units(layout: Layout) -> str:
    units = [_unit_label(t, lv, b) for t, lv, b, _ in layout.units()]
    if not units:
        return "it has no units yet"
    shown = ", ".join(units[:8]) + (f" and {len(units) - 8} more" if len(units) > 8 else "")
    return f"its units: {shown}"


def unit_state_dict(workdir: str, trial: int, level: int, branch: Optional[str] = None,
                    include_masks: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict, safetensors metadata) of the final weights of a finished unit.

    WorkdirError, in one line, for a directory that is not a workdir, a unit that does not exist
    or one that has not finished.
    """
    layout = Layout(workdir)
    if not os.path.exists(layout.marker):
        raise WorkdirError(f"{layout.root} is not a sparse_robust workdir (no "
                           f"{os.path.basename(layout.marker)}); pass the --workdir of a run.")
    if branch is not None and not re.fullmatch(r"[A-Za-z0-9_]+", branch):
        raise WorkdirError(f"branch {branch!r} is not a branch name (letters, digits and _).")
    files = layout.unit(trial, level, branch)
    label = _unit_label(trial, level, branch)
    if not os.path.isdir(files.dir):
        raise WorkdirError(f"{label} does not exist in {layout.root}; {_known_units(layout)}.")
    if not os.path.exists(files.result):
        raise WorkdirError(f"{label} of {layout.root} has not finished (no result.json); run the "
                           "experiment again to finish it, then export.")
    config = store.read_json(layout.config)
    restored = store.load_tree_raw(files.final_variables)
    params, model_state = restored[0], restored[1] or {}
    num_classes = int(np.shape(params["output"]["kernel"])[-1])
    model = models_lib.get_model(config["model"]["name"], num_classes=num_classes,
                                 width_multiplier=config["model"]["width_multiplier"])
    mask = masks_lib.mask_from_numpy(params, store.read_mask_arrays(files.mask))
    steps = int(store.read_json(files.result).get("steps", 0))  # BN's num_batches_tracked
    arrays = interop.to_state_dict(model, params, model_state, mask, include_masks=include_masks,
                                   num_batches_tracked=steps)
    alive, total = masks_lib.count(mask)
    metadata = {"format": "pt", "sparse_robust.model": config["model"]["name"],
                "sparse_robust.width_multiplier": str(config["model"]["width_multiplier"]),
                "sparse_robust.num_classes": str(num_classes),
                "sparse_robust.unit": label,
                "sparse_robust.weights_remaining": f"{alive / total:.6g}",
                "sparse_robust.dataset": str(config.get("data", {}).get("name", ""))}
    return arrays, metadata
