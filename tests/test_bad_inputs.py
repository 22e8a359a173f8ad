"""Every bad input a user can give, in one table: a wrong config field, broken data, a damaged
workdir file. Each must stop before any training with one line, ``error: ...``, that names the
field or file, and must leave an existing workdir byte-identical (even with --overwrite)."""

import os
import shutil
import zipfile

import numpy as np
import pytest

from conftest import set_field
from experiments import main as cli


def setter(dotted, value):
    return lambda config: set_field(config, dotted, value)


def deleter(dotted):
    def change(config):
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        del node[leaf]
    return change


def changes(*steps):
    def change(config):
        for step in steps:
            step(config)
    return change


NAN, INF = float("nan"), float("inf")

CONFIG_CASES = [
    ("lr_inf", setter("train.learning_rate", INF), "config.train.learning_rate = inf"),
    ("lr_nan", setter("train.learning_rate", NAN), "config.train.learning_rate = nan"),
    ("lr_negative", setter("train.learning_rate", -0.1), "config.train.learning_rate = -0.1"),
    ("momentum_negative", setter("train.momentum", -0.5), "config.train.momentum = -0.5"),
    ("momentum_one", setter("train.momentum", 1.0), "config.train.momentum = 1.0"),
    ("weight_decay_negative", setter("train.weight_decay", -1e-4), "config.train.weight_decay"),
    ("label_smoothing_one", setter("train.label_smoothing", 1.0), "config.train.label_smoothing"),
    ("optimizer", setter("train.optimizer", "rmsprop"), "config.train.optimizer = 'rmsprop'"),
    ("objective", setter("train.objective", "fgsm-at"), "config.train.objective = 'fgsm-at'"),
    ("train_attack_label", setter("train.attack", "cw"), "config.train.attack = 'cw'"),
    ("eval_attacks_empty", setter("eval.attacks", ""), "config.eval.attacks = ''"),
    ("eval_attacks_twice", setter("eval.attacks", "fgsm,fgsm"), "config.eval.attacks"),
    ("eval_every_zero", setter("eval.every", 0), "config.eval.every = 0"),
    ("checkpoint_not_multiple", setter("checkpoint_every", 30), "config.checkpoint_every = 30"),
    ("attack_eps_negative", setter("attacks.pgd.eps", -0.1), "config.attacks.pgd: eps=-0.1"),
    ("attack_step_inf", setter("attacks.pgd.step_size", INF), "config.attacks.pgd: step_size"),
    ("attack_steps_zero", setter("attacks.pgd.num_steps", 0), "config.attacks.pgd: num_steps=0"),
    ("attack_name", setter("attacks.fgsm.name", "cw"), "config.attacks.fgsm: name='cw'"),
    ("strategy", setter("prune.strategy", "rewind"), "config.prune.strategy = 'rewind'"),
    ("rewind_step_zero", setter("prune.strategy", "rewind_step"), "config.prune.rewind_step = 0"),
    ("rate_one", setter("prune.rates.default", 1.0), "config.prune.rates.default = 1.0"),
    ("granularity", setter("prune.granularity", "filter"), "config.prune.granularity = 'filter'"),
    ("channel_global", changes(setter("prune.granularity", "channel"),
                               setter("prune.scope", "global")),
     "config.prune.granularity = 'channel'"),
    ("rate_unknown_layer", setter("prune.rates", {"default": 0.2, "conv_9": 0.1}),
     "config.prune.rates: Pruning rates name unknown layers ['conv_9']"),
    ("targets_decreasing", changes(setter("prune.levels", 0), setter("prune.scope", "global"),
                                   setter("prune.targets", "0.9,0.5")), "config.prune.targets"),
    ("targets_and_levels", changes(setter("prune.scope", "global"),
                                   setter("prune.targets", "0.5")), "config.prune.levels = 2"),
    ("targets_layerwise", changes(setter("prune.levels", 0), setter("prune.targets", "0.5")),
     "config.prune.scope = 'layerwise'"),
    ("branch_unknown", setter("branches.names", "magic"), "config.branches.names = 'magic'"),
    ("branch_level", changes(setter("branches.names", "inherit"), setter("branches.levels", "9")),
     "config.branches.levels = '9'"),
    ("branch_setting", setter("branches.inverse_inheritance.fill", "ones"),
     "config.branches.inverse_inheritance.fill = 'ones'"),
    ("hydra_channel_global", changes(setter("prune.granularity", "channel"),
                                     setter("branches.names", "hydra"),
                                     setter("branches.hydra.allocation", "global")),
     "config.branches.hydra.allocation = 'global'"),
    ("radmm_channel_global", changes(setter("prune.granularity", "channel"),
                                     setter("branches.names", "radmm"),
                                     setter("branches.radmm.scope", "global")),
     "config.branches.radmm.scope = 'global'"),
    ("harp_alpha_one", setter("branches.harp.alpha", 1.0), "config.branches.harp.alpha = 1.0"),
    ("harp_gamma_negative", setter("branches.harp.gamma", -1.0),
     "config.branches.harp.gamma = -1.0"),
    ("harp_steps_negative", setter("branches.harp.num_steps", -5),
     "config.branches.harp.num_steps = -5"),
    ("harp_rate_lr_zero", setter("branches.harp.rate_learning_rate", 0.0),
     "config.branches.harp.rate_learning_rate = 0.0"),
    ("radmm_rho_zero", setter("branches.radmm.rho", 0.0), "config.branches.radmm.rho = 0.0"),
    ("radmm_rho_growth_below_one", setter("branches.radmm.rho_growth", 0.5),
     "config.branches.radmm.rho_growth = 0.5"),
    ("radmm_rounds_zero", setter("branches.radmm.rounds", 0), "config.branches.radmm.rounds = 0"),
    ("radmm_scope", setter("branches.radmm.scope", "per_layer"),
     "config.branches.radmm.scope = 'per_layer'"),
    ("model_name", setter("model.name", "resnet-99"), "config.model.name = 'resnet-99'"),
    ("width_zero", setter("model.width_multiplier", 0.0), "config.model.width_multiplier = 0.0"),
    ("conv_impl", setter("model.conv_impl", "fft"), "config.model.conv_impl = 'fft'"),
    ("sparse_impl", setter("model.sparse_impl", "csr"), "config.model.sparse_impl = 'csr'"),
    ("seed_negative", setter("seed", -1), "config.seed = -1"),
    ("seed_huge", setter("seed", 99999999999999999999), "config.seed = 99999999999999999999"),
    ("trials_zero", setter("num_trials", 0), "config.num_trials = 0"),
    ("steps_zero", setter("train.num_steps", 0), "config.train.num_steps = 0"),
    ("unknown_field", setter("train.learnign_rate", 0.1),
     "config.train.learnign_rate is not a field; fields of config.train: adv_weight"),
    ("missing_field", deleter("train.loop"), "config.train.loop is missing"),
    ("augment_flat", setter("train.augment", True), "config.train.augment = True"),
    # Checks that need the data or the devices (made after loading, still before the claim).
    ("batch_too_large", setter("train.batch_size", 600), "config.train.batch_size = 600"),
    ("validation_too_large", setter("data.validation_size", 600),
     "config.data.validation_size=600 is invalid"),
    ("validation_zero", setter("data.validation_size", 0), "config.data.validation_size = 0"),
    ("eval_examples_too_many", setter("eval.num_examples", 5000),
     "config.eval.num_examples = 5000"),
    ("sanity_too_many", setter("eval.sanity_examples", 5000), "config.eval.sanity_examples = 5000"),
    ("devices_too_many", setter("parallel.num_devices", 64), "config.parallel.num_devices = 64"),
    ("conv_on_flat_data", setter("model.name", "conv-2"), "config.model.name = 'conv-2'"),
]


def truncated_copy(source, target, name, keep_bytes):
    shutil.copytree(source, target)
    path = os.path.join(target, name)
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[:keep_bytes])


DATA_CASES = [  # (id, damage the data dir copy, expected)
    ("data_missing", lambda src, dst: None, "IDX file"),
    ("data_truncated", lambda src, dst: truncated_copy(src, dst, "train-images-idx3-ubyte.gz",
                                                       500), "train-images-idx3-ubyte.gz"),
    ("labels_corrupt_gzip", lambda src, dst: truncated_copy(src, dst, "t10k-labels-idx1-ubyte.gz",
                                                            8), "t10k-labels-idx1-ubyte.gz"),
]


def overwrite_text(path, text="{not json"):
    with open(path, "w") as f:
        f.write(text)


def largest_file(directory):
    files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


WORKDIR_CASES = [  # (id, damage the workdir copy, the file the message names)
    ("config_json", lambda w: overwrite_text(os.path.join(w, "config.json")), "config.json"),
    ("marker_json", lambda w: overwrite_text(os.path.join(w, "sparse_robust.json")),
     "sparse_robust.json"),
    ("config_missing", lambda w: os.remove(os.path.join(w, "config.json")), "config.json"),
    ("summary_json", lambda w: overwrite_text(os.path.join(w, "summary.json")), "summary.json"),
    ("result_json", lambda w: overwrite_text(os.path.join(w, "trial_0/level_01/result.json")),
     "level_01/result.json"),
    ("metrics_jsonl", lambda w: overwrite_text(os.path.join(w, "trial_0/level_02/metrics.jsonl")),
     "level_02/metrics.jsonl"),
    ("mask_npz", lambda w: overwrite_text(os.path.join(w, "trial_0/level_02/mask.npz"), "PK junk"),
     "level_02/mask.npz"),
    ("mask_truncated", lambda w: truncate(os.path.join(w, "trial_0/level_01/mask.npz")),
     "level_01/mask.npz"),
    ("mask_wrong_leaves", lambda w: np.savez(os.path.join(w, "trial_0/level_01/mask.npz"),
                                             **{"x/kernel": np.ones(3, bool)}),
     "level_01/mask.npz"),
    ("checkpoint_truncated",
     lambda w: truncate(largest_file(os.path.join(w, "trial_0/level_01/final_variables"))),
     "level_01/final_variables"),
    ("result_of_another_run", lambda w: overwrite_text(
        os.path.join(w, "trial_0/level_00/result.json"),
        open(os.path.join(w, "trial_0/level_00/result.json")).read().replace(
            '"run_id": "', '"run_id": "x')), "level_00/result.json belongs to another run"),
]


@pytest.fixture(scope="module")
def finished(finish_tiny_run):
    return finish_tiny_run(20)


def run_cli(config, workdir, read_error, overwrite=True) -> str:
    """The CLI's run; returns its one error line."""
    read_error.clear()
    assert cli.run_and_report(config, workdir, overwrite) == 2
    return read_error()


def test_the_table_is_large_enough():
    assert len(CONFIG_CASES) + len(DATA_CASES) + len(WORKDIR_CASES) >= 30


@pytest.mark.parametrize("change, expected", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(finished, load_config, tmp_path, tree_digest, one_error_line, change,
               expected):
    config_file, original = finished
    config = load_config(config_file)
    change(config)
    fresh = str(tmp_path / "fresh")
    assert expected in run_cli(config, fresh, one_error_line)
    assert not os.path.exists(fresh)  # nothing created, nothing claimed
    existing = str(tmp_path / "existing")
    shutil.copytree(original, existing)
    before = tree_digest(existing)
    assert expected in run_cli(config, existing, one_error_line)
    assert tree_digest(existing) == before
    assert sorted(os.listdir(tmp_path)) == ["existing"]  # nothing moved aside


@pytest.mark.parametrize("damage, expected", [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data(finished, load_config, idx_data_dir, tmp_path, tree_digest, one_error_line,
                  damage, expected):
    config_file, original = finished
    data_dir = str(tmp_path / "data")
    damage(str(idx_data_dir), data_dir)
    config = load_config(config_file)
    config.data.data_dir = data_dir
    existing = str(tmp_path / "existing")
    shutil.copytree(original, existing)
    before = tree_digest(existing)
    message = run_cli(config, existing, one_error_line)
    assert expected in message and data_dir in message
    assert tree_digest(existing) == before


@pytest.mark.parametrize("damage, expected", [c[1:] for c in WORKDIR_CASES],
                         ids=[c[0] for c in WORKDIR_CASES])
def test_damaged_workdir(finished, load_config, tmp_path, tree_digest, one_error_line, damage,
                        expected):
    config_file, original = finished
    existing = str(tmp_path / "existing")
    shutil.copytree(original, existing)
    damage(existing)
    before = tree_digest(existing)
    message = run_cli(load_config(config_file), existing, one_error_line, overwrite=False)
    assert expected in message
    assert tree_digest(existing) == before


def test_a_workdir_inside_a_file_is_one_line_before_compute(finished, load_config, tmp_path,
                                                             one_error_line):
    """--workdir=FILE/run (as --workdir=/etc/hostname/run): the parent is a file."""
    config_file, _ = finished
    a_file = tmp_path / "hostname"
    a_file.write_text("not a folder")
    message = run_cli(load_config(config_file), str(a_file / "run"), one_error_line)
    assert f"{a_file} is a file, not a folder" in message and "--workdir" in message
    assert a_file.read_text() == "not a folder"


def test_a_mask_is_a_zip_archive(finished):
    """The damaged-mask case above writes junk where a zip archive belongs."""
    assert zipfile.is_zipfile(os.path.join(finished[1], "trial_0/level_02/mask.npz"))


def test_a_diverging_config_stops_with_the_step_and_valid_metrics(tiny_config_file, load_config,
                                                                  tmp_path, one_error_line):
    config = load_config(tiny_config_file(20))
    config.train.update(optimizer="sgd", learning_rate=1e20, momentum=0.0)  # finite, absurd
    path = str(tmp_path / "run")
    message = run_cli(config, path, one_error_line, overwrite=False)
    assert "training diverged in trial 0 level 0: the loss is nan at step" in message
    assert "config.train.learning_rate" in message
    import json
    metrics = os.path.join(path, "trial_0", "level_00", "metrics.jsonl")
    if os.path.exists(metrics):
        for line in open(metrics):
            json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_a_full_disk_is_one_line_and_the_run_then_resumes(finished, load_config, tmp_path,
                                                          one_error_line, monkeypatch):
    import errno
    config_file, original = finished
    path = str(tmp_path / "run")
    real_replace = os.replace

    def disk_full_at_level_1(src, dst):
        if str(dst).endswith(os.path.join("level_01", "result.json")):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full_at_level_1)
    message = run_cli(load_config(config_file), path, one_error_line, overwrite=False)
    assert "level_01/result.json: the disk is full" in message
    assert "run the same command again to resume" in message
    monkeypatch.undo()
    assert cli.run_and_report(load_config(config_file), path) == 0
    timeless = lambda records: [{k: v for k, v in r.items()
                                 if k not in ("train_seconds", "steps_per_second")}
                                for r in records]
    from sparse_robust.runs import store
    from sparse_robust.runs.layout import Layout
    assert timeless(store.read_json(Layout(path).summary)) == timeless(
        store.read_json(Layout(original).summary))


def test_a_checkpoint_write_refused_by_the_disk_is_one_line(tiny_config_file, load_config,
                                                            tmp_path, one_error_line,
                                                            monkeypatch):
    """orbax wraps the OSError of a failed write in its own exception: the cause is found."""
    import errno
    from sparse_robust.runs import store

    def refuse(self, path, *args, **kwargs):
        try:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        except OSError as err:
            raise RuntimeError("orbax: save failed") from err

    monkeypatch.setattr(store.ocp.StandardCheckpointer, "save", refuse)
    message = run_cli(load_config(tiny_config_file(20)), str(tmp_path / "run"), one_error_line,
                      overwrite=False)
    assert "init_params: the file system is read-only" in message
