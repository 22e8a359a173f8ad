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
