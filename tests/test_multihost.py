"""One run on two processes computes what one process computes.

Two CLI processes with one CPU device each (gloo collectives over localhost, on a port chosen at
run time) train a tiny lottery (2 levels) into one workdir, while one process with 2 simulated
devices and one with 1 device train it too. Then: killing both processes mid-level and launching
them again resumes to the same final numbers; killing one stops the other with a clear error
within the heartbeat timeout; a workdir that process 0 refuses, configs that differ or data missing on
one process stop both.
"""

import os
import signal
import socket
import time

import numpy as np
import pytest

from sparse_robust.runs import store
from sparse_robust.runs.layout import Layout

STEPS = 60              # per level, checkpoints every 20: a kill at the first one is mid-level
EXTRA = ("--config.prune.levels=1", "--config.parallel.num_devices=0")
HEARTBEAT_TIMEOUT = 20  # seconds, --heartbeat_timeout of the two-process runs
ORBAX_DIRS = ("init_params", "start_params", "progress", "final_variables")
TIMINGS = ("train_seconds", "steps_per_second")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The processes' environment: one CPU device each unless told otherwise, and a compilation
    cache shared by all (the runs compile the same programs: only the first one pays)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("compilation_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def launch(start_cli, env, config_file, path, process_1_extra=()):
    """The two processes of one run (process 0 first)."""
    port = free_port()
    return [start_cli(config_file, path, *EXTRA, f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", f"--process_id={i}",
                      f"--heartbeat_timeout={HEARTBEAT_TIMEOUT}",
                      *(process_1_extra if i == 1 else ()), env=env)
            for i in range(2)]


def outcome(process, timeout=300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def config_file(tiny_config_file):
    return tiny_config_file(STEPS)


@pytest.fixture(scope="module")
def finished(config_file, start_cli, wait_for_holder, env, tmp_path_factory):
    """The tiny run finished by two processes, by one process with 2 simulated devices and by
    one with 1 device, all started together: ({name: workdir}, (the two processes' pids, the
    lock's holder while they ran, [(code, stdout, stderr)] by process))."""
    paths = {name: tmp_path_factory.mktemp(name) / "run"
             for name in ("two_processes", "two_devices", "one_device")}
    processes = launch(start_cli, env, config_file, paths["two_processes"])
    alone = [start_cli(config_file, paths[name], *EXTRA,
                       env=dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"))
             for name, n in (("two_devices", 2), ("one_device", 1))]
    holder = wait_for_holder(paths["two_processes"], processes[0])
    for process in alone:
        code, _, err = outcome(process)
        assert code == 0, err
    return paths, ([p.pid for p in processes], holder, [outcome(p) for p in processes])


def timeless(tree):
    """A JSON tree without its wall-clock times."""
    if isinstance(tree, dict):
        return {k: timeless(v) for k, v in tree.items() if k not in TIMINGS}
    return [timeless(v) for v in tree] if isinstance(tree, list) else tree


def records(path) -> list[dict]:
    return timeless(store.read_json(Layout(str(path)).summary))


def masks(path) -> dict:
    return {(trial, level): store.read_mask_arrays(files.mask)
            for trial, level, _, files in Layout(str(path)).units()}


def histories(path) -> dict:
    return {f"{trial}/{level}": timeless(store.read_jsonl(files.metrics))
            for trial, level, _, files in Layout(str(path)).units()}


def assert_same_masks(path, reference) -> None:
    mine, theirs = masks(path), masks(reference)
    assert mine.keys() == theirs.keys()
    for unit, arrays in theirs.items():
        assert mine[unit].keys() == arrays.keys()
        for name, alive in arrays.items():
            np.testing.assert_array_equal(mine[unit][name], alive, err_msg=f"{unit} {name}")


def engine_files(path) -> list[str]:
    """Every file the engine writes itself (orbax's checkpoint folders are listed, not opened)."""
    out = []
    for root, dirs, files in os.walk(path):
        out += [os.path.relpath(os.path.join(root, d), path) for d in dirs if d in ORBAX_DIRS]
        dirs[:] = [d for d in dirs if d not in ORBAX_DIRS]
        out += [os.path.relpath(os.path.join(root, f), path) for f in files]
    return sorted(out)


def numbers(tree) -> list[float]:
    """The numbers of a JSON tree, in a fixed order."""
    if isinstance(tree, dict):
        return [x for key in sorted(tree) for x in numbers(tree[key])]
    if isinstance(tree, list):
        return [x for item in tree for x in numbers(item)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_two_processes_compute_what_one_process_computes(finished):
    paths, (pids, holder, outcomes) = finished
    path = paths["two_processes"]
    for process, (code, _, err) in enumerate(outcomes):
        assert code == 0, f"process {process}: {err}"
    assert "| Level |" in outcomes[0][1] and "| Level |" not in outcomes[1][1]  # one report
    assert holder["pid"] == pids[0]  # the run's lock is process 0's
    assert open(Layout(str(path)).lock).read() == ""  # and released
    assert engine_files(path) == engine_files(paths["one_device"])  # the same files, no others
    mine = records(path)
    assert [(r["trial"], r["level"]) for r in mine] == [(0, 0), (0, 1)]
    assert mine[1]["weights_remaining"] < 1  # level 1 is pruned
    for reference in (paths["two_devices"], paths["one_device"]):
        assert_same_masks(path, reference)
        theirs = records(reference)
        assert [sorted(r) for r in mine] == [sorted(r) for r in theirs]
        # Accuracies on 200 test images agree exactly or within one image; losses within float
        # rounding (one device sums the gradients in another order than two).
        np.testing.assert_allclose(numbers(mine), numbers(theirs), rtol=1e-5, atol=1 / 200)
        np.testing.assert_allclose(numbers(histories(path)), numbers(histories(reference)),
                                   rtol=1e-4, atol=1e-5)


def test_killing_both_processes_mid_level_and_relaunching_resumes_to_the_same_numbers(
        finished, config_file, start_cli, env, wait_for, tmp_path):
    path, uninterrupted = tmp_path / "run", finished[0]["two_processes"]
    layout = Layout(str(path))
    processes = launch(start_cli, env, config_file, path)
    wait_for(os.path.join(layout.unit(0, 1).progress, "20"), timeout=300)
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)
    for process in processes:
        process.wait(timeout=60)
    assert not os.path.exists(layout.unit(0, 1).result)  # killed in the middle of level 1
    for process, (code, _, err) in enumerate(map(outcome, launch(start_cli, env, config_file,
                                                                 path))):
        assert code == 0, f"process {process}: {err}"
    assert records(path) == records(uninterrupted)
    assert histories(path) == histories(uninterrupted)
    assert_same_masks(path, uninterrupted)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_process_that_dies_stops_the_other_within_the_timeout(
        config_file, start_cli, env, wait_for, tmp_path, victim):
    path = tmp_path / "run"
    processes = launch(start_cli, env, config_file, path)
    wait_for(Layout(str(path)).unit(0, 0).progress, timeout=300)
    os.kill(processes[victim].pid, signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = outcome(processes[1 - victim], timeout=HEARTBEAT_TIMEOUT + 120)
    assert time.monotonic() - killed < HEARTBEAT_TIMEOUT + 60  # generous: it takes ~1 s here
    assert code != 0
    if victim == 1:
        # Process 0 notices at its next collective operation and says so in one line.
        assert code == 3, err
        [line] = error_lines(err)
        assert line.startswith("error: process 0 of 2 lost contact with the other processes of "
                               "this run (one has probably died: see its log)"), err
        assert "Traceback" not in err
    else:
        # Process 0 also served the coordination: JAX's runtime stops the others itself, unless
        # process 1 meets the closed connection at a collective operation first (a race).
        noticed = [line for line in error_lines(err) if line.startswith(
            "error: process 1 of 2 lost contact with the other processes of this run")]
        assert "another task died" in err or noticed, err


@pytest.mark.parametrize("foreign, process_1_extra, message", [
    (True, (), "is not a sparse_robust workdir"),  # process 0 refuses the workdir
    (False, ("--config.train.learning_rate=0.002",), "were given different configs"),
    (False, ("--config.data.data_dir=/nonexistent",), "not found"),  # on process 1 only
], ids=["workdir_refused", "configs_differ", "data_missing_on_process_1"])
def test_a_refusal_stops_every_process(config_file, start_cli, env, tmp_path, tree_digest,
                                       foreign, process_1_extra, message):
    path = tmp_path / "run"
    if foreign:
        path.mkdir()
        (path / "thesis.tex").write_text("\\documentclass{article}")
    before = tree_digest(tmp_path)
    processes = launch(start_cli, env, config_file, path, process_1_extra)
    for process, (code, _, err) in enumerate(map(outcome, processes)):
        assert code == 2, f"process {process}: {err}"
        [line] = error_lines(err)
        assert message in line, err
    assert tree_digest(tmp_path) == before  # nothing created or changed
