r"""Run an experiment config into a workdir.

  python -m experiments.main --config=experiments/configs/quickstart.py --workdir=runs/quickstart
  python -m experiments.main --config=experiments/configs/cosentino_fashion_mnist.py \
      --config.train.attack=pgd --config.prune.strategy=random_reinit --workdir=runs/pgd_random

Re-running the same command resumes: finished levels are skipped and an interrupted level
continues from its last checkpoint. A different config in the same workdir is refused unless
--overwrite. When the run ends, the paper-style table is printed and plots are written to
WORKDIR/report/.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sparse_robust import config as config_lib
from sparse_robust import data as data_lib
from sparse_robust import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete a run with a different config found in --workdir.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that are the user's to fix: a message, not a traceback.
USER_ERRORS = (config_lib.ConfigError, workdir_lib.WorkdirError, data_lib.DataError)


def run(config, workdir: str, overwrite: bool) -> list:
    """Dispatch on config.experiment (the lottery pipeline unless the config names another)."""
    experiment = config.get("experiment", "lottery")
    if experiment == "lottery":
        from sparse_robust import lottery
        return lottery.run(config, workdir, overwrite=overwrite)
    if experiment == "adversarial_pruning":
        from sparse_robust import methods
        return methods.run(config, workdir, overwrite=overwrite)
    raise config_lib.ConfigError(f"config.experiment = {experiment!r} is invalid: choose "
                                 "'lottery' or 'adversarial_pruning'.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    from experiments import report
    print(report.write_report([_WORKDIR.value]))


if __name__ == "__main__":
    app.run(main)
