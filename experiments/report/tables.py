"""Tables (markdown and LaTeX), their legends, the failed sanity checks and the conclusion."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from experiments.report.load import (ACCURACY_FIELDS, METHOD_TITLES, WORST_CASE, Run,
                                     accuracy_getters, as_runs, attack_settings, attack_title,
                                     level_groups, mean_std, method, method_rank, num_trials,
                                     remaining_percent, resolve_attacks, table_method)
from sparse_robust.checks import check_choice

FORMATS = ("markdown", "latex")
_CONTROLS = {"reinit": "the same mask re-initialised", "random": "a random mask of the same size"}
_MISSING = {"markdown": "—", "latex": "--"}
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _cell(values, scale: float, decimals: int, fmt: str) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return _MISSING[fmt]
    mean, std = mean_std(values)
    if std is None:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}" if fmt == "markdown" else \
        f"${mean:.{decimals}f} \\pm {std:.{decimals}f}$"


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def _render(fmt: str, caption: str, header: list, blocks: list, notes: Sequence[str] = ()) -> str:
    """A table with its caption above and its legend notes below."""
    text_columns = ("Run", "Method", "Large network", "Layer")
    if fmt == "markdown":
        lines = [caption, "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if h in text_columns else "---:" for h in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for rows in blocks for row in rows]
        lines += [""] + [f"- {note}" for note in notes] if notes else []
        return "\n".join(lines) + "\n"
    spec = "".join("l" if h in text_columns else "r" for h in header)
    # Cells built by _cell are already LaTeX (math mode); labels and percentages are escaped.
    cell = lambda c: c if c.startswith("$") or c == _MISSING["latex"] else _latex_escape(c)
    lines = [f"% {caption}"] + [f"% {note}" for note in notes]
    lines += [f"\\begin{{tabular}}{{{spec}}}", r"\hline",
              " & ".join(_latex_escape(h) for h in header) + r" \\", r"\hline"]
    for rows in blocks:
        lines += [" & ".join(cell(c) for c in row) + r" \\" for row in rows]
        lines.append(r"\hline")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def _test_examples(runs: Sequence[Run]) -> str:
    counts = sorted({r.get("test_examples") for run in runs for r in run.records} - {None})
    return "/".join(f"{n:,}" for n in counts) if counts else "all"


def _what(accuracy: str) -> str:
    return "of the early-stopping weights" if accuracy == "early_stop" else "of the final weights"


def legend(runs: Sequence[Run], attacks: Sequence[str]) -> list[str]:
    """The notes every accuracy table needs: what worst case and pred. labels mean."""
    notes = []
    if WORST_CASE in attacks:
        notes.append("Worst case: an image counts as robust only if it is classified correctly "
                     "clean and under every attack of the table (the per-image minimum over "
                     "the evaluators: the number to trust).")
    if any((attack_settings(runs, a) or {}).get("name") == "autoattack" for a in attacks):
        notes.append("AutoAttack: the standard version (Croce & Hein 2020): APGD-CE, then APGD-T, "
                     "FAB-T and Square, each on the images every earlier stage left robust; the "
                     "accuracy after each stage is in summary.json (attack_stages).")
    if any((attack_settings(runs, a) or {}).get("label_source") == "predicted" for a in attacks):
        notes.append("pred. labels: the attack pushes away from the model's own prediction (as "
                     "Cosentino et al. measured) and is scored against the true label, so a "
                     "misclassified image can be pushed onto its true class: optimistic. The "
                     "worst case only counts images classified correctly, whose predicted and "
                     "true labels coincide: it is a true-label measure.")
    return notes


def paper_table(runs: Union[Run, Sequence[Run]], fmt: str = "markdown",
                attacks: Optional[Sequence[str]] = None, accuracy: str = "final") -> str:
    """The paper-style table: a row per (run, method, level), ordered by level within a run.

    Columns: weights remaining (%), clean accuracy and accuracy under each attack (in the order of
    the config, each titled with its steps, ε and label source; worst case last), all in %, and
    the early-stopping step; each cell is mean ± std over trials.
    """
    check_choice("fmt", fmt, FORMATS)
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = as_runs(runs)
    attacks = resolve_attacks(runs, attacks, accuracy)
    getters = accuracy_getters(accuracy, attacks)
    show_run = len(runs) > 1
    show_method = any("branch" in r for run in runs for r in run.records)
    header = (["Run"] if show_run else []) + (["Method"] if show_method else [])
    # Channel pruning shrinks the network: its FLOPs (after compact) go beside the weights.
    show_flops = any(run.config.get("prune", {}).get("granularity") == "channel" for run in runs)
    header += ["Level", "Weights remaining (%)"] + (["FLOPs (M)"] if show_flops else [])
    header += ["Clean"]
    header += [attack_title(a, attack_settings(runs, a)) for a in attacks] + ["Early stop (step)"]
    blocks = []
    for run in runs:
        rows = []
        groups = sorted(level_groups(run.records), key=lambda g: (method_rank(g[0] or "lottery"),
                                                                  g[1]))
        for m, level, records in groups:
            row = ([run.label] if show_run else []) + ([table_method(records[0])] if show_method
                                                       else [])
            row += [str(level), f"{remaining_percent(records):.1f}"]
            if show_flops:
                row.append(_cell([r.get("forward_flops") for r in records], 1e-6, 2, fmt))
            row += [_cell([g(r) for r in records], 100, 2, fmt) for g in getters.values()]
            row.append(_cell([r.get("early_stop_step") for r in records], 1, 0, fmt))
            rows.append(row)
        blocks.append(rows)
    caption = (f"Test accuracy (%) {_what(accuracy)} on {_test_examples(runs)} test images; "
               f"mean ± std (ddof=1) over {num_trials(runs)} trial(s).")
    metric = runs[0].config.get("eval", {}).get("early_stop_metric", "objective")
    notes = legend(runs, attacks) + ([
        "FLOPs (M): millions of matmul and convolution FLOPs (2 per multiply-add) of one forward "
        "pass on one image, counted on the jaxpr of the unit's network with its dead channels "
        "removed (pruning.compact; MLPs and conv-2/4/6), with direct (XLA) convolutions."]
        if show_flops else []) + [
        f"Early stop: the step with the lowest validation {metric.replace('_', ' ')} (the "
        f"accuracies are {'those weights' if accuracy == 'early_stop' else 'of the final weights'})."]
    return _render(fmt, caption, header, blocks, notes)


def _level_label(level: int, records: Sequence[dict]) -> str:
    """"dense" for level 0, else the level's sparsity (of the chain's ticket)."""
    if level == 0:
        return "dense"
    chain = [r for r in records if not method(r)] or records
    return f"{100 - remaining_percent(chain):.1f}% sparse"


def _compared(run: Run) -> list[dict]:
    """The records of the methods table: the branches, and the chain at the branches' levels."""
    branches = [r for r in run.records if "branch" in r]
    levels = {r["level"] for r in branches} | {0}
    return branches + [r for r in run.records if "branch" not in r and r["level"] in levels] \
        if branches else []


def methods_table(runs: Union[Run, Sequence[Run]], fmt: str = "markdown",
                  accuracy: str = "final") -> str:
    """Methods as rows, levels (by sparsity) as columns, each cell "clean / robust" test accuracy
    (%) with robust = the worst case over the evaluation attacks (mean ± std over trials).

    Only runs with branches count; "" when there are none. For inverse inheritance the column is
    the sparsity of the inherited small network (the large network is dense).
    """
    check_choice("fmt", fmt, FORMATS)
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = as_runs(runs)
    getters = accuracy_getters(accuracy, [WORST_CASE])
    show_run = len(runs) > 1
    columns = {}
    for run in runs:
        records = _compared(run)
        for level in sorted({r["level"] for r in records}):
            columns.setdefault(level, _level_label(level, [r for r in records
                                                           if r["level"] == level]))
    if not columns:
        return ""
    blocks, shown = [], set()
    for run in runs:
        groups = {}
        for record in _compared(run):
            groups.setdefault(table_method(record), {}).setdefault(record["level"], []).append(
                record)
        rows = []
        for name in sorted(groups, key=method_rank):
            row = ([run.label] if show_run else []) + [name]
            for level in columns:
                records = groups[name].get(level)
                row.append(_MISSING[fmt] if not records else " / ".join(
                    _cell([g(r) for r in records], 100, 1, fmt) for g in getters.values()))
            rows.append(row)
        blocks.append(rows)
        shown |= set(groups)
    header = (["Run"] if show_run else []) + ["Method"] + list(columns.values())
    caption = (f"Clean / robust test accuracy (%) {_what(accuracy)} by method and sparsity "
               f"({_test_examples(runs)} test images; mean ± std over trials).")
    notes = legend(runs, [WORST_CASE])
    if shown & {"inverse_inheritance", "scratch_large"}:
        notes.append("inverse_inheritance: the dense large network that inherited that level's "
                     "sparse network; scratch_large: the same large network trained from scratch.")
    return _render(fmt, caption, header, blocks, notes)


def inverse_inheritance_table(runs: Union[Run, Sequence[Run]], fmt: str = "markdown",
                              accuracy: str = "final") -> str:
    """The large network trained from scratch vs inheriting each level's sparse network: clean,
    per-attack and worst-case accuracy (%), and the worst-case gain over from-scratch (points).
    "" when no run has both "scratch_large" and "inverse_inheritance" records."""
    check_choice("fmt", fmt, FORMATS)
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = as_runs(runs)
    attacks = resolve_attacks(runs, None, accuracy)
    getters = accuracy_getters(accuracy, attacks)
    worst = getters.get(WORST_CASE)
    show_run = len(runs) > 1
    blocks = []
    for run in runs:
        scratch = [r for r in run.records if method(r) == "scratch_large"]
        inverse = [r for r in run.records if method(r) == "inverse_inheritance"]
        if not (scratch and inverse):
            continue
        rows = [(["from scratch"], scratch)]
        for level in sorted({r["level"] for r in inverse}):
            records = [r for r in inverse if r["level"] == level]
            sparsity = f"{100 - remaining_percent(records):.1f}% sparse"
            rows.append(([f"inherits {records[0].get('source', '?')} ({sparsity})"], records))
        baseline = np.mean([worst(r) for r in scratch]) if worst else None
        block = []
        for name, records in rows:
            row = ([run.label] if show_run else []) + name
            row += [_cell([g(r) for r in records], 100, 2, fmt) for g in getters.values()]
            gain = (100 * (np.mean([worst(r) for r in records]) - baseline)
                    if worst and records is not scratch else None)
            row.append(_MISSING[fmt] if gain is None else f"{gain:+.2f}")
            block.append(row)
        blocks.append(block)
    if not blocks:
        return ""
    widths = sorted({r.get("width_multiplier", 1.0) for run in runs for r in run.records
                     if method(r) == "scratch_large"})
    header = (["Run"] if show_run else []) + ["Large network", "Clean"]
    header += [attack_title(a, attack_settings(runs, a)) for a in attacks] + ["Gain (worst case)"]
    caption = (f"Inverse weights inheritance: the large network (width x"
               f"{'/'.join(map(str, widths))}) adversarially trained from scratch vs after "
               "inheriting a sparse network; test accuracy (%), mean ± std over trials; gain in "
               "points over from scratch.")
    return _render(fmt, caption, header, blocks, legend(runs, attacks))


def harp_rates_table(runs: Union[Run, Sequence[Run]], fmt: str = "markdown",
                     accuracy: str = "final") -> str:
    """HARP's keep rates per layer (%), learned / final (scaled to the level's target), one
    column per sparsity, mean ± std over trials; "" when no record has them. (``accuracy`` is
    accepted so every table takes the same arguments; rates do not depend on it.)"""
    check_choice("fmt", fmt, FORMATS)
    runs = as_runs(runs)
    show_run = len(runs) > 1
    blocks, columns = [], {}
    for run in runs:
        records = [r for r in run.records if "harp_rates" in r]
        levels = sorted({r["level"] for r in records})
        for level in levels:
            columns.setdefault(level, _level_label(level, [r for r in run.records
                                                           if r["level"] == level]))
        layers = list(dict.fromkeys(l for r in records for l in r["harp_rates"]["learned"]))
        block = []
        for layer in layers:
            row = ([run.label] if show_run else []) + [layer]
            for level in columns:
                at = [r["harp_rates"] for r in records if r["level"] == level]
                row.append(_MISSING[fmt] if not at else " / ".join(
                    _cell([a[kind][layer] for a in at], 100, 2, fmt)
                    for kind in ("learned", "final")))
            block.append(row)
        if block:
            blocks.append(block)
    if not blocks:
        return ""
    header = (["Run"] if show_run else []) + ["Layer"] + list(columns.values())
    caption = ("HARP's keep rate per layer (% of the layer's weights): learned in the score phase "
               "/ final (the learned rates scaled by one factor to the level's weights "
               "remaining); mean ± std over trials.")
    return _render(fmt, caption, header, blocks)


def failed_sanity_checks(runs: Union[Run, Sequence[Run]]) -> str:
    """A markdown list of the gradient-masking checks that failed (``sanity_checks`` in the
    records), one line per run, method, level and trial; "" when none failed."""
    from experiments.report.load import series
    lines = []
    for name, _, _, records in series(as_runs(runs)):
        for record in records:
            checks = record.get("sanity_checks") or {}
            sample = f", first {checks['num_examples']} test images" \
                if "num_examples" in checks else ""
            for check, outcome in sorted(checks.items()):
                if isinstance(outcome, dict) and not outcome["passed"]:
                    where = "" if check.endswith(("square_finds_nothing_new",
                                                  "fmn_finds_nothing_new")) else sample
                    lines.append(f"- {name}, level {record['level']}, trial {record['trial']}"
                                 f"{where}: **{check}**: {outcome['detail']}")
    if not lines:
        return ""
    return ("Sanity checks FAILED: the robustness numbers they concern are suspect. The "
            "gradient-masking checks attack with their own FGSM, PGD-20, APGD-CE and APGD-DLR at "
            "the periodic attack's ε (true labels); *deterministic_at_evaluation* (two clean "
            "passes agree) and *few_zero_gradients* (share of images with a zero input gradient "
            "of the cross-entropy) are the reference implementation's warnings, on the same "
            "images; *square_finds_nothing_new* reads AutoAttack's stages and "
            "*fmn_finds_nothing_new* FMN's robustness curve at AutoAttack's ε, on the final "
            "evaluation's images.\n\n" + "\n".join(lines) + "\n")


def conclusion(runs: Union[Run, Sequence[Run]], accuracy: str = "final") -> str:
    """One sentence per run, computed from its records: the sparsest ticket's robust accuracy
    (worst case) against the dense network's and the controls' at the same level. "" when a run
    has no pruned level or no worst case."""
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = as_runs(runs)
    robust = accuracy_getters(accuracy, [WORST_CASE])[WORST_CASE]
    evaluators = [attack_title(a, attack_settings(runs, a))
                  for a in resolve_attacks(runs, None, accuracy) if a != WORST_CASE]
    sentences = []
    for run in runs:
        chain = [r for r in run.records if not method(r)]
        if not chain or max(r["level"] for r in chain) == 0 or robust(chain[0]) is None:
            continue
        top = max(r["level"] for r in chain)
        mean = lambda records: 100 * float(np.mean([robust(r) for r in records]))
        ticket = [r for r in chain if r["level"] == top]
        dense = [r for r in chain if r["level"] == 0]
        controls = [(name, [r for r in run.records if method(r) == name and r["level"] == top])
                    for name in ("reinit", "random")]
        against = [f"{mean(dense):.1f} % for the dense network"] + [
            f"{mean(records):.1f} % for {_CONTROLS[name]}" for name, records in controls if records]
        against = ", ".join(against[:-1]) + " and " + against[-1] if len(against) > 1 \
            else against[0]
        prefix = f"{run.label}: " if len(runs) > 1 else ""
        sentences.append(
            f"{prefix}At {remaining_percent(ticket):.1f} % of the weights, the lottery ticket keeps "
            f"{mean(ticket):.1f} % robust accuracy, against {against} (worst case over "
            f"{', '.join(evaluators)}; {_test_examples([run])} test images).")
        sentences += _method_ranking(run, robust, prefix)
    return "\n".join(sentences)


_DENSE_METHODS = ("dense", "inverse_inheritance", "scratch_large")  # not sparse networks


def _method_ranking(run: Run, robust, prefix: str) -> list[str]:
    """Where a run compares pruning methods (beyond the lottery ticket's controls): per pruned
    level, the sparse methods ranked by mean worst-case robust accuracy, and whether the first
    is ahead of the second by more than the larger of their two stds (else these trials do not
    separate them)."""
    sentences = []
    for level in sorted({r["level"] for r in _compared(run)} - {0}):
        at_level = [r for r in _compared(run) if r["level"] == level]
        groups = {}
        for record in at_level:
            if table_method(record) not in _DENSE_METHODS and robust(record) is not None:
                groups.setdefault(table_method(record), []).append(100 * robust(record))
        if len(groups) < 2 or not set(groups) - set(_CONTROLS) - {"lottery"}:
            continue  # the lottery ticket and its controls alone: the sentence above says it
        stats = sorted(((name, *mean_std(values)) for name, values in groups.items()),
                       key=lambda s: -s[1])
        title = lambda name: METHOD_TITLES.get(name, name)
        shown = lambda name, mean, std: f"{title(name)} {mean:.1f}" + (
            f" ± {std:.1f}" if std is not None else "")
        (first, m1, s1), (second, m2, s2) = stats[:2]
        lead = round(m1, 1) - round(m2, 1)
        ahead = (f"{lead:.1f} points ahead of {title(second)}" if lead > 0
                 else f"level with {title(second)}")
        if s1 is None or s2 is None:
            verdict = f"{ahead} (one trial: no spread to judge by)"
        elif lead > max(s1, s2):
            verdict = f"{ahead}, more than the larger of their stds ({max(s1, s2):.1f})"
        else:
            verdict = (f"{ahead}, within the larger of their stds ({max(s1, s2):.1f}): "
                       f"{min(len(groups[first]), len(groups[second]))} trials do not separate "
                       f"them")
        chain = [r for r in at_level if not method(r)] or at_level
        sentences.append(
            f"{prefix}At {100 - remaining_percent(chain):.1f} % sparsity, robust accuracy (worst "
            f"case, %): " + "; ".join(shown(*s) for s in stats)
            + f". {title(first)[0].upper() + title(first)[1:]} is {verdict}.")
    return sentences
