"""The quickstart config on a slice of the real Fashion-MNIST: the sparsest ticket is robust far
above chance under the worst case of its evaluators, and the printed conclusion is computed from
the records."""

import os
import re

import pytest

from experiments import report
from experiments.configs import quickstart
from sparse_robust.runs import pipeline

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not os.path.isdir(FASHION_MNIST):
        pytest.skip(f"needs the Fashion-MNIST IDX files in {FASHION_MNIST} "
                    "(apt-get install dataset-fashion-mnist; scripts/setup_env.sh does it)")
    config = quickstart.get_config()
    config.progress = False
    config.data.update(source="idx", train_limit=10_000)
    config.train.num_steps = 400
    config.eval.update(every=200, num_examples=300, final_examples=300)
    config.attacks.autoattack.update(num_steps=20, n_target_classes=3, num_queries=300)
    config.checkpoint_every = 200
    config.prune.levels = 2
    config.branches.levels = "2"
    path = str(tmp_path_factory.mktemp("quickstart"))
    pipeline.run(config, path)
    return report.load_run(path)


def test_the_sparsest_ticket_is_robust_far_above_chance(run):
    sparsest = max((r for r in run.records if "branch" not in r), key=lambda r: r["level"])
    assert sparsest["weights_remaining"] < 0.15
    robust = sparsest["robust_accuracy"]
    assert set(robust) == {"pgd20", "autoattack", "worst_case"}
    assert list(sparsest["attack_stages"]["autoattack"]) == ["apgd_ce", "apgd_t", "fab_t",
                                                             "square"]
    assert robust["worst_case"] == min(robust.values())
    assert robust["worst_case"] > 0.3  # chance is 0.1
    assert {r.get("branch") for r in run.records} == {None, "reinit", "random"}


def test_the_conclusion_is_computed_from_the_records(run):
    text = report.conclusion(run)
    numbers = [float(n) for n in re.findall(r"(\d+\.\d) %", text)]
    by = {(r["level"], r.get("branch")): r for r in run.records}
    worst = lambda key: round(100 * by[key]["robust_accuracy"]["worst_case"], 1)
    assert numbers == [round(100 * by[(2, None)]["weights_remaining"], 1), worst((2, None)),
                       worst((0, None)), worst((2, "reinit")), worst((2, "random"))]
    assert ("PGD-20 ε=0.1, AutoAttack ε=0.1 (20 steps, 3 targets, 300 queries); 300 test images"
            in text)
    # The printed report ends with it.
    written = report.write_report([run.workdir])
    assert written.rstrip().endswith(text)
    assert "inverse_inheritance:" not in written  # a legend line only for the methods shown
