"""Every shipped config validates; the schema and experiments/configs/base.py name the same
fields (a field in one and not the other fails here, and --help lists every one)."""

import importlib
import os

import pytest

from experiments.configs import base
from sparse_robust.runs import schema

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "configs")
CONFIGS = sorted(name[:-3] for name in os.listdir(CONFIG_DIR)
                 if name.endswith(".py") and name != "__init__.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_validates(name):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    schema.validate(config)
    labels = schema.attack_labels(config)
    assert labels, name
    # The strongest evaluator is in every shipped config.
    assert any(config.attacks[label]["name"] == "autoattack" for label in labels), name


def test_the_base_config_has_exactly_the_schemas_fields():
    config = base.get_config()
    fields = {spec.path for spec in schema.all_fields()}
    leaves = set(schema._leaf_paths(config)) - set(schema.FREE_MAPPINGS)
    assert leaves == fields
    text = schema.describe(config)  # what --help prints
    for path in fields:
        assert f"config.{path} = " in text


@pytest.mark.parametrize("name, model", [("apb_cifar10_resnet18", "resnet-18"),
                                         ("apb_cifar10_vgg16", "vgg-16-hydra")])
def test_benchmark_configs_state_the_protocol_and_run(name, model, tmp_path):
    """The Adversarial Pruning Benchmark's configs: CIFAR-10, 90/95/99 %, L∞ 8/255, AutoAttack on
    the full test set, every method; then the config itself, shrunk (width 1/16, XLA convolutions,
    2 steps per phase, the 99 % target only, a 1-step PGD evaluation, the random branch only:
    HYDRA, HARP and RADMM compile a ResNet-18 / VGG-16 program each, minutes on a shared CPU;
    their end-to-end runs are tests/test_harp_radmm_branches.py and test_branches.py), runs on
    synthetic 32x32x3 data."""
    from sparse_robust import data, models
    from sparse_robust.runs import pipeline
    if model not in models.available_models():
        pytest.skip(f"model {model!r} is not in this checkout (it comes with the interop work)")
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    schema.validate(config)
    assert config.model.name == model and config.data.name == "cifar10"
    assert config.prune.targets == "0.9,0.95,0.99"
    assert set(config.branches.names.split(",")) >= {"hydra", "harp", "radmm", "random"}
    [label] = schema.attack_labels(config)
    assert config.attacks[label]["name"] == "autoattack"
    assert config.attacks[label]["eps"] == config.attacks[config.train.attack]["eps"] == 8 / 255
    assert config.eval.final_examples == 0 and config.train.objective == "madry"

    config.progress = False
    config.model.update(width_multiplier=1 / 16, conv_impl="xla")
    config.prune.targets = "0.99"
    config.branches.names = "random"
    config.train.update(num_steps=2, batch_size=8)
    config.retrain.num_steps = 2
    config.attacks.pgd.num_steps = 1
    config.eval.update(every=2, num_examples=8, batch_size=8, attacks="pgd", final_examples=8)
    config.checkpoint_every = 2
    config.data.validation_size = 8
    schema.validate(config)
    dataset = data.make_synthetic(0, num_train=32, num_val=8, num_test=8, image_shape=(32, 32, 3))
    records = pipeline.run(config, str(tmp_path), dataset=dataset)
    assert sorted((r["level"], r.get("branch") or "") for r in records) == [
        (0, ""), (1, ""), (1, "random")]
    for r in records:
        if r["level"] == 1:
            assert r["weights_remaining"] == pytest.approx(0.01, abs=1e-4)


@pytest.mark.parametrize("name, model", [("shootout_fashion_mnist", "dense-300-100"),
                                         ("shootout_fashion_mnist_conv", "lenet-5")])
def test_shootout_configs_compare_every_method_alike(name, model):
    """Real Fashion-MNIST, 90/95/99 %, >= 3 trials, every method, one fine-tuning budget,
    AutoAttack (standard, true labels) as the strongest evaluator."""
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    schema.validate(config)
    assert config.model.name == model and config.data.name == "fashion_mnist"
    assert config.prune.targets == "0.9,0.95,0.99" and config.num_trials >= 3
    assert config.prune.strategy == "rewind_init"  # the lottery ticket, with rewinding
    assert set(config.branches.names.split(",")) >= {"random", "hydra", "harp", "radmm",
                                                     "inverse_inheritance"}
    assert config.retrain.num_steps > 0  # one fine-tuning budget for every one-shot method
    labels = schema.attack_labels(config)
    aa = [config.attacks[label] for label in labels
          if config.attacks[label]["name"] == "autoattack"]
    assert aa and aa[0]["label_source"] == "true" and aa[0].get("version", "standard") == "standard"
    assert all(config.attacks[label]["label_source"] == "true" for label in labels)
