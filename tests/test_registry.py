"""The method registry: a leaf the engine reads, complete, and README's "Add a method" true as
written (its three blocks registered as they stand, then run as a branch of a tiny run)."""

import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from sparse_robust.pruning import registry
from sparse_robust.runs import branches, pipeline, schema, store
from sparse_robust.runs.errors import ConfigError
from sparse_robust.runs.layout import Layout
from test_branches import tiny_config, tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_a_method_blocks() -> list[tuple[str, str]]:
    """(path, code) of each ```py block of README's "Add a method" section."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Add a method"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"```py\n(.*?)```", section, re.S)
    return [(re.match(r"# (\S+\.py)", b).group(1), b) for b in blocks]


def test_the_registry_is_a_leaf():
    """Importing it (and listing the branches) imports nothing of the engine: schema, context and
    branches can all read it without a circle."""
    code = ("import sys, sparse_robust.pruning.registry as r; r.branch_names(); "
            "print([m for m in sys.modules if m.startswith('sparse_robust.runs')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_every_branch_file_is_registered_under_its_own_name():
    files = {f[:-3] for f in os.listdir(os.path.join(ROOT, "sparse_robust", "runs", "branches"))
             if f.endswith(".py") and f != "__init__.py"}
    assert {registry.get(n).branch.rsplit(".", 1)[1] for n in branches.names()} == files
    for name in branches.names():
        assert branches.get(name).name == name
        registry.get(name).load_library()


def test_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Method("hydra", "again", "sparse_robust.pruning.hydra"))


@pytest.fixture
def readme_method():
    """README's toy method, registered exactly as its blocks say; removed afterwards."""
    blocks = add_a_method_blocks()
    assert [p for p, _ in blocks] == ["sparse_robust/pruning/smallest.py",
                                      "sparse_robust/runs/branches/smallest.py",
                                      "sparse_robust/pruning/registry.py"]
    added = []
    try:
        for path, code in blocks[:2]:
            name = path[:-3].replace("/", ".")
            module = types.ModuleType(name)
            sys.modules[name] = module
            added.append(name)
            exec(compile(code, f"README.md: {path}", "exec"), module.__dict__)
        exec(compile(blocks[2][1], "README.md: registry entry", "exec"), dict(vars(registry)))
        yield sys.modules[added[0]]
    finally:
        registry.unregister("smallest")
        for name in added:
            sys.modules.pop(name, None)


def test_the_readme_method_runs_as_a_branch(readme_method, tmp_path):
    cfg = tiny_config()
    cfg.branches.names = "smallest"
    schema.validate(cfg)  # the schema knows the new name
    records = pipeline.run(cfg, str(tmp_path), dataset=tiny_dataset())
    [record] = [r for r in records if r.get("branch") == "smallest"]
    assert record["level"] == 2 and 0 <= record["clean_accuracy"] <= 1
    layout = Layout(str(tmp_path))
    mask = store.read_mask_arrays(layout.unit(0, 2, "smallest").mask)
    level_mask = store.read_mask_arrays(layout.unit(0, 2).mask)
    dense, _ = store.load_tree_raw(layout.unit(0, 0).final_variables)
    for name, alive in mask.items():
        layer, leaf = name.split("/")
        w = np.abs(np.asarray(dense[layer][leaf]))
        assert alive.sum() == level_mask[name].sum()  # the level's per-layer count
        if 0 < alive.sum() < alive.size:  # and the smallest weights (independent check)
            assert w[alive].max() <= w[~alive].min()


def test_an_unregistered_name_is_refused_by_the_schema():
    cfg = tiny_config()
    cfg.branches.names = "smallest"
    with pytest.raises(ConfigError, match="branches.names"):
        schema.validate(cfg)
