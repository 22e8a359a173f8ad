"""Who may use a workdir, and what --overwrite may touch: the lock between processes, taking over
a dead holder's lock, refusing what is not a workdir, moving a replaced run aside only after every
check has passed. Real CLI processes run a tiny config on a tiny IDX dataset."""

import json
import os
import signal

import pytest

from experiments import main as cli
from sparse_robust.runs import store, workdir
from sparse_robust.runs.errors import CorruptFileError, WorkdirError
from sparse_robust.runs.layout import Layout


@pytest.fixture(scope="module")
def finished(finish_tiny_run):
    """A finished tiny run: (config file, workdir)."""
    return finish_tiny_run(40)


def test_two_processes_on_one_workdir_one_runs_the_other_is_refused(
        tiny_config_file, load_config, tmp_path, one_error_line, start_cli, wait_for_holder):
    config_file = tiny_config_file(200)
    path = tmp_path / "run"
    first = start_cli(config_file, path)
    holder = wait_for_holder(path, first)
    assert holder["pid"] == first.pid
    code = cli.run_and_report(load_config(config_file), str(path))
    assert code == 2
    message = one_error_line()
    assert f"in use by another run (pid {first.pid} on {holder['host']} since" in message
    # An --overwrite with another config is refused the same way, while the run is live.
    changed = load_config(config_file)
    changed.train.learning_rate = 2e-3
    assert cli.run_and_report(changed, str(path), overwrite=True) == 2
    assert "in use by another run" in one_error_line()
    assert first.wait(timeout=300) == 0, first.communicate()
    records = store.read_json(Layout(str(path)).summary)
    assert [r["level"] for r in records] == [0, 1, 2]
    assert len({r["run_id"] for r in records}) == 1
    assert store.read_json(Layout(str(path)).config)["train"]["learning_rate"] == 1.2e-3
    assert not any(name.startswith("run.replaced") for name in os.listdir(tmp_path))


def test_a_killed_holders_lock_is_taken_over(tiny_config_file, load_config, tmp_path, start_cli,
                                             wait_for, wait_for_holder):
    config_file = tiny_config_file(200)
    path = tmp_path / "run"
    first = start_cli(config_file, path)
    wait_for_holder(path, first)
    wait_for(Layout(str(path)).unit(0, 0).progress)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert json.loads(open(Layout(str(path)).lock).read())["pid"] == first.pid  # left behind
    assert cli.run_and_report(load_config(config_file), str(path)) == 0
    records = store.read_json(Layout(str(path)).summary)
    assert [r["level"] for r in records] == [0, 1, 2]
    assert open(Layout(str(path)).lock).read() == ""  # released


def test_overwrite_never_touches_a_directory_that_is_not_a_workdir(
        finished, load_config, tmp_path, tree_digest, one_error_line):
    config_file, _ = finished
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    (thesis / "figures").mkdir()
    (thesis / "figures" / "plot.pdf").write_bytes(b"%PDF-1.4")
    before = tree_digest(thesis)
    for overwrite in (False, True):
        assert cli.run_and_report(load_config(config_file), str(thesis), overwrite) == 2
        assert "is not a sparse_robust workdir" in one_error_line()
        assert tree_digest(thesis) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert cli.run_and_report(load_config(config_file), str(a_file), True) == 2
    assert "is not a sparse_robust workdir" in one_error_line()
    assert a_file.read_text() == "keep me"


def copy_of(path, tmp_path):
    import shutil
    target = tmp_path / "run"
    shutil.copytree(path, target)
    return str(target)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.data.update(data_dir="/nonexistent/fashion"), "IDX file /nonexistent/fashion"),
    (lambda c: c.train.update(batch_size=5000), "config.train.batch_size = 5000 is invalid"),
])
def test_overwrite_that_fails_a_check_leaves_the_old_run_as_it_was(
        finished, load_config, tmp_path, tree_digest, one_error_line, change, message):
    config_file, original = finished
    path = copy_of(original, tmp_path)
    before = tree_digest(path)
    config = load_config(config_file)
    config.train.learning_rate = 2e-3  # another config...
    change(config)                      # ...that fails a check before any compute
    assert cli.run_and_report(config, path, overwrite=True) == 2
    assert message in one_error_line()
    assert tree_digest(path) == before
    assert os.listdir(tmp_path) == ["run"]  # nothing moved aside


def test_overwrite_moves_the_old_run_aside_and_starts_afresh(
        finished, load_config, tmp_path, tree_digest, one_error_line):
    config_file, original = finished
    path = copy_of(original, tmp_path)
    before = tree_digest(path)
    config = load_config(config_file)
    config.prune.levels = 1
    assert cli.run_and_report(config, path) == 2  # another config without --overwrite
    assert "holds a run with another config (prune.levels: 2 -> 1)" in one_error_line()
    assert tree_digest(path) == before
    assert cli.run_and_report(config, path, overwrite=True) == 0
    moved = [name for name in os.listdir(tmp_path) if name.startswith("run.replaced-")]
    assert len(moved) == 1
    assert tree_digest(tmp_path / moved[0]) == before  # the old run, intact
    assert [r["level"] for r in store.read_json(Layout(path).summary)] == [0, 1]


def test_the_same_config_resumes_and_trains_nothing(finished, load_config, tmp_path,
                                                    tree_digest, monkeypatch):
    config_file, original = finished
    path = copy_of(original, tmp_path)
    from sparse_robust.runs import fit
    monkeypatch.setattr(fit, "fit", lambda *a: pytest.fail("a finished level was trained"))
    records = store.read_json(Layout(path).summary)
    assert cli.run_and_report(load_config(config_file), path) == 0
    assert store.read_json(Layout(path).summary) == records


def test_a_result_of_another_run_is_refused(finished, load_config, tmp_path):
    config_file, original = finished
    path = copy_of(original, tmp_path)
    layout = Layout(path)
    result = layout.unit(0, 1).result
    record = store.read_json(result)
    record["run_id"] = "0123456789abcdef"
    store.write_json(result, record)
    with pytest.raises(CorruptFileError, match=r"level_01/result.json belongs to another run"):
        from sparse_robust.runs import units
        units.records(layout)


def test_decide(tmp_path):
    layout = Layout(str(tmp_path / "w"))
    fields = {"seed": 0}
    assert workdir.precheck(layout, fields, False) == "new"
    with workdir.claim(layout, fields) as decision:
        assert decision == "new"
    assert workdir.precheck(layout, fields, False) == "resume"
    with pytest.raises(WorkdirError, match=r"seed: 0 -> 1"):
        workdir.precheck(layout, {"seed": 1}, False)
    assert workdir.precheck(layout, {"seed": 1}, True) == "replace"
    # While one claim holds the workdir, another is refused and names it.
    with workdir.claim(layout, fields):
        with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {os.getpid()}"):
            with workdir.claim(layout, fields):
                pass
