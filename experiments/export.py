r"""Export a finished unit's final weights as a PyTorch state dict in a safetensors file.

  python -m experiments.export --workdir=runs/quickstart --level=3 --out=ticket.safetensors
  python -m experiments.export --workdir=DIR --level=2 --branch=hydra --masks --out=FILE.safetensors

Names and layouts are PyTorch's (`sparse_robust.interop`; resnet-18 and vgg-16-hydra load
strictly into the Adversarial Pruning Benchmark's definitions); pruned weights are zeros. With
--masks, every mask also goes into the file as `<weight name>_mask` (float 0 / 1), as
`torch.nn.utils.prune` names it (`sparse_robust.interop.torch_models.load_pruned` loads it so).
"""

import sys

from absl import app
from absl import flags
from absl import logging

from sparse_robust.runs import errors
from sparse_robust.runs import export
from sparse_robust.runs import store

def export_unit(workdir: str, trial: int, level: int, branch, include_masks: bool,
                out: str) -> int:
    """Writes the file and prints one line about it; one `error:` line and 2 on a user error."""
    try:
        arrays, metadata = export.unit_state_dict(workdir, trial, level, branch, include_masks)
        store.save_safetensors(out, arrays, metadata)
    except errors.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        disk = store.disk_error(err, out)
        if disk is None:
            raise
        print(f"error: {disk}", file=sys.stderr)
        return 2
    remaining = float(metadata["sparse_robust.weights_remaining"])
    print(f"wrote {out}: {metadata['sparse_robust.model']} {metadata['sparse_robust.unit']}, "
          f"{len(arrays)} arrays, weights remaining {remaining:.2%}")
    return 0


def _define_flags() -> None:
    """Only when run as a program: tests import export_unit next to experiments.main, whose
    --workdir would clash."""
    flags.DEFINE_string("workdir", None, "Workdir of the run.")
    flags.DEFINE_integer("trial", 0, "Trial of the unit.", lower_bound=0)
    flags.DEFINE_integer("level", None, "Pruning level of the unit.", lower_bound=0)
    flags.DEFINE_string("branch", None, "Branch at that level (default: the chain's unit).")
    flags.DEFINE_bool("masks", False, "Also write every mask as `<weight name>_mask`.")
    flags.DEFINE_string("out", None, "The .safetensors file to write.")
    flags.mark_flags_as_required(["workdir", "level", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every restore at INFO
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    sys.exit(export_unit(f.workdir, f.trial, f.level, f.branch, f.masks, f.out))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
