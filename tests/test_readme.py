"""README.md's Python blocks run as written (the tour), and with a batch-norm model in place of
dense-300-100 (the tiny conv net of conftest.py: batch statistics in model_state)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MODEL_LINE = 'model = models.get_model("dense-300-100")'


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run_blocks(blocks, namespace) -> dict:
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    return namespace


def test_the_tour_has_its_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert sum(MODEL_LINE in b for b in blocks) == 1


@pytest.mark.parametrize("model", ["as written", "batch norm"])
def test_the_readme_code_runs(model, tiny_conv_bn, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    namespace = {}
    if model == "batch norm":
        blocks = [b.replace(MODEL_LINE, "model = TinyConvBN(num_classes=10)") for b in blocks]
        namespace["TinyConvBN"] = tiny_conv_bn
    ns = run_blocks(blocks, namespace)
    if model == "batch norm":  # the tour trained and evaluated batch statistics
        assert ns["state"].model_state["batch_stats"]
    # What the tour shows holds: pruned weights stayed zero, attacks stayed in the ball, the
    # worst case is below every attack, the chain's masks shrank.
    from sparse_robust import masks
    for name, alive in masks.mask_leaves(ns["mask"]).items():
        assert not masks.named_leaves(ns["state"].params)[name][~alive].any()
    assert ns["results"]["worst_case_accuracy"] <= min(ns["results"]["pgd_accuracy"],
                                                       ns["results"]["apgd_dlr_accuracy"])
    remaining = [r["weights_remaining"] for r in ns["records"]]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] < remaining[0]
