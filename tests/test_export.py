"""experiments.export: a finished unit of a real (tiny) run as a safetensors PyTorch state dict."""

import re
import shutil

import jax
import numpy as np
import pytest

from experiments import export as export_cli
from sparse_robust import interop, masks
from sparse_robust.models import get_model
from sparse_robust.runs import store
from sparse_robust.runs.layout import Layout


@pytest.fixture(scope="module")
def workdir(finish_tiny_run):
    return finish_tiny_run(20)[1]  # lenet-300-100 on 8x8 images, levels 0 and 1


def test_export_then_import_gives_the_units_weights_and_mask(workdir, tmp_path, capsys):
    out = str(tmp_path / "ticket.safetensors")
    assert export_cli.export_unit(workdir, 0, 1, None, True, out) == 0
    assert "wrote" in capsys.readouterr().out
    files = Layout(workdir).unit(0, 1)
    params, _ = store.load_tree_raw(files.final_variables)
    saved_mask = masks.mask_from_numpy(params, store.read_mask_arrays(files.mask))
    assert masks.weights_remaining(saved_mask) < 1.0  # level 1 is pruned

    model = get_model("lenet-300-100")
    imported = interop.from_state_dict(model, store.read_safetensors(out), (1, 8, 8, 1))
    for name, value in masks.named_leaves(masks.apply_mask(params, saved_mask)).items():
        np.testing.assert_array_equal(masks.named_leaves(imported.params)[name], value)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), imported.mask, saved_mask))


def test_export_without_masks_has_no_mask_keys(workdir, tmp_path):
    out = str(tmp_path / "plain.safetensors")
    assert export_cli.export_unit(workdir, 0, 0, None, False, out) == 0
    assert sorted(store.read_safetensors(out)) == sorted(
        interop.expected_keys(get_model("lenet-300-100"), (1, 64)))


@pytest.mark.parametrize("trial, level, branch, message", [
    (0, 9, None, r"trial 0 level 9 does not exist in .*; its units: trial 0 level 0"),
    (3, 0, None, r"trial 3 level 0 does not exist"),
    (0, 1, "hydra", r"trial 0 level 1 branch 'hydra' does not exist"),
    (0, 1, "../x", r"is not a branch name"),
], ids=["level", "trial", "branch", "bad branch"])
def test_a_unit_that_does_not_exist_is_one_line(workdir, tmp_path, one_error_line, trial, level,
                                               branch, message):
    out = tmp_path / "x.safetensors"
    assert export_cli.export_unit(workdir, trial, level, branch, False, str(out)) == 2
    assert re.search(message, one_error_line())
    assert not out.exists()


def test_an_unfinished_unit_or_a_non_workdir_is_one_line(workdir, tmp_path, one_error_line):
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    (copy / "trial_0" / "level_01" / "result.json").unlink()
    out = tmp_path / "x.safetensors"
    assert export_cli.export_unit(str(copy), 0, 1, None, False, str(out)) == 2
    assert "trial 0 level 1 of" in one_error_line() and not out.exists()
    assert export_cli.export_unit(str(tmp_path), 0, 1, None, False, str(out)) == 2
    assert "is not a sparse_robust workdir" in one_error_line()


def test_a_damaged_file_is_one_line(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(store.CorruptFileError, match="is not a readable safetensors file"):
        store.read_safetensors(str(path))
