r"""Run an experiment config into a workdir.

  python -m experiments.main --config=experiments/configs/quickstart.py --workdir=runs/quickstart
  python -m experiments.main --config=experiments/configs/cosentino_fashion_mnist.py \
      --config.train.attack=pgd --config.prune.strategy=random_reinit --workdir=runs/pgd_random

Re-running the same command resumes: finished levels are skipped and an interrupted one continues
from its last checkpoint. A different config in the same workdir is refused unless --overwrite,
which moves the old run aside (DIR.replaced-<time>); a directory that is not a workdir is never
touched. When the run ends, the table is printed and plots are written to WORKDIR/report/.
Compiled programs are kept in --compilation_cache (default ~/.cache/sparse_robust/xla), so the next
process that needs one reads it instead of compiling it again.

Several processes (one per host; or several on one machine) run one experiment together when
each is given the same --coordinator_address=HOST:PORT (process 0's host and a free port) and
--num_processes=N, and its own --process_id; under SLURM, Open MPI or on a TPU pod,
--config.parallel.distributed=True detects all three. Process 0 writes the workdir, which must be
on a file system every process shares. If a process dies, the others stop within
--heartbeat_timeout seconds (exit status 3 when they notice it themselves).

Any field can be overridden with --config.<field>=<value>; the fields, their defaults (those of
experiments/configs/base.py) and their allowed values:

"""

import importlib.util
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sparse_robust import data as data_lib
from sparse_robust.runs import compilation
from sparse_robust.runs import errors
from sparse_robust.runs import hosts
from sparse_robust.runs import pipeline
from sparse_robust.runs import schema
from sparse_robust.runs import store

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Move a run with a different config found in --workdir aside "
                               "(to WORKDIR.replaced-<time>) and start afresh.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process run: HOST:PORT where process 0 serves the "
    "coordination (the same on every process). Default: $JAX_COORDINATOR_ADDRESS, or detected "
    "under SLURM / Open MPI / TPU pods with --config.parallel.distributed=True.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process run: how many processes run it.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process's id, "
                                   "0 .. num_processes-1 (process 0 writes the workdir).",
                                   lower_bound=0)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", hosts.Launch.heartbeat_timeout, "Multi-process run: seconds without "
    "news from a process after which it is declared dead and the others stop.", lower_bound=1)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", compilation.default_dir(), "Folder of the persistent XLA compilation "
    "cache: a resumed run or the next config reads the programs compiled before instead of "
    "compiling them again (same numbers). Empty: compile without a cache.")
flags.mark_flags_as_required(["config", "workdir"])

USER_ERRORS = (errors.UserError, data_lib.DataError)


def _load_config_file(argv):
    """The config of ``--config=PATH`` (for messages about overrides), or None."""
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"--config(?:=(.*))?", arg)
        if match:
            path = match.group(1) if match.group(1) is not None else \
                (argv[i + 1] if i + 1 < len(argv) else "")
            spec = importlib.util.spec_from_file_location("user_config", path)
            if spec is None or not os.path.isfile(path):
                return None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.get_config()
    return None


def _override_message(argv) -> str:
    """Name the --config.<field> override that does not exist, with the fields allowed there."""
    config = _load_config_file(argv)
    known = schema.known_paths()
    for arg in argv:
        match = re.fullmatch(r"--config\.([^=]+)(=.*)?", arg)
        if not match:
            continue
        path = match.group(1)
        node = config
        for part in path.split("."):
            if node is None or not hasattr(node, "keys") or part not in node:
                return f"--config.{path}: " + schema.unknown_field(path, known)
            node = node[part]
    return "a --config override names a field that does not exist"


def parse_flags(argv):
    """absl's flag parsing, with a one-line error instead of a traceback for a bad override."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err)
    except (KeyError, AttributeError):
        message = _override_message(argv)
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _report(workdir: str) -> str:
    from experiments import report
    return report.write_report([workdir])


def run_and_report(config, workdir: str, overwrite: bool = False, dataset=None,
                   launch: hosts.Launch | None = None) -> int:
    """Run ``config`` in ``workdir`` and print its table; returns the exit code. A user's mistake
    (config, data, workdir, disk, divergence) is printed as one line, ``error: ...``. With a
    ``launch``, this process first joins the others of a multi-process run; if one of them dies,
    this one prints one line and exits at once with ``hosts.LOST_EXIT_CODE``."""
    try:
        if launch is not None:
            hosts.join(launch)
        pipeline.run(config, workdir, overwrite=overwrite, dataset=dataset)
        table = hosts.on_primary(lambda: _report(workdir), "the report")
        if hosts.is_primary():
            print(table)
        return 0
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:
        disk = store.disk_error(err, workdir)
        if disk is None:
            raise
        print(f"error: {disk}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume {workdir}.", file=sys.stderr)
        return 130
    except Exception as err:
        lost = hosts.lost_contact(err)
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr)
        hosts.abandon(hosts.LOST_EXIT_CODE)
    return 2


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    try:
        compilation.use_compilation_cache(_COMPILATION_CACHE.value)
    except errors.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    launch = hosts.Launch(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                          _HEARTBEAT_TIMEOUT.value)
    joins = launch.explicit or config.parallel.distributed
    sys.exit(run_and_report(config, _WORKDIR.value, _OVERWRITE.value,
                            launch=launch if joins else None))


def _help_text() -> str:
    from experiments.configs import base
    return __doc__ + schema.describe(base.get_config())


if __name__ == "__main__":
    __doc__ = _help_text()
    app.run(main, flags_parser=parse_flags)
