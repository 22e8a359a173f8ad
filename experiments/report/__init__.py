r"""Tables and plots from experiment workdirs.

  python -m experiments.report WORKDIR [WORKDIR ...] [--out DIR] [--accuracy final|early_stop]

prints the paper-style table (test accuracy per level, mean ± std over trials, every attack
titled with its steps, ε and label source; for runs with branches also the methods table and
inverse inheritance vs from scratch), the failed sanity checks and a conclusion computed from the
numbers, and writes into DIR (default: the first WORKDIR/report) table.md, table.tex and PNG
plots: accuracy vs weights remaining, learning curves, early stopping, weight distributions,
robust accuracy vs the diagnostics and FMN's robustness curves beside AutoAttack's point when
the records carry them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from experiments.report.load import ACCURACY_FIELDS, Run, load_run, load_runs
from experiments.report.plots import (accuracy_figure, diagnostic_names, diagnostics_figure,
                                      early_stopping_figure,
                                      learning_curves, learning_curves_figure,
                                      plot_accuracy_vs_weights, plot_diagnostics,
                                      plot_early_stopping, plot_learning_curves,
                                      plot_robustness_curves, plot_weight_distributions,
                                      robustness_curves_figure, surviving_weights,
                                      weight_figures)
from experiments.report.tables import (FORMATS, conclusion, failed_sanity_checks,
                                       harp_rates_table, inverse_inheritance_table,
                                       methods_table, paper_table)
from sparse_robust.checks import check_choice
from sparse_robust.runs.errors import UserError

__all__ = ["Run", "accuracy_figure", "conclusion", "diagnostic_names", "diagnostics_figure",
           "early_stopping_figure", "failed_sanity_checks", "harp_rates_table",
           "inverse_inheritance_table", "learning_curves",
           "learning_curves_figure", "load_run", "load_runs", "main", "methods_table",
           "paper_table", "plot_accuracy_vs_weights", "plot_diagnostics", "plot_early_stopping",
           "plot_learning_curves", "plot_robustness_curves", "plot_weight_distributions",
           "robustness_curves_figure", "surviving_weights",
           "weight_figures", "write_report"]


def write_report(workdirs: Sequence[str], out_dir: Optional[str] = None,
                 accuracy: str = "final") -> str:
    """Write table.md, table.tex and every plot into out_dir (default: the first WORKDIR/report);
    return the markdown (tables, failed sanity checks, conclusion)."""
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = load_runs(workdirs)
    out_dir = out_dir or runs[0].layout.report_dir
    tables = (paper_table, methods_table, inverse_inheritance_table, harp_rates_table)
    markdown, latex = ("\n".join(t for t in (table(runs, fmt, accuracy=accuracy) for table in tables)
                                 if t) for fmt in FORMATS)
    for extra in (failed_sanity_checks(runs), conclusion(runs, accuracy)):
        markdown += f"\n{extra}\n" if extra else ""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("table.md", markdown), ("table.tex", latex)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    plot_learning_curves(runs, out_dir)
    plot_accuracy_vs_weights(runs, out_dir, accuracy=accuracy)
    plot_early_stopping(runs, out_dir)
    for run in runs:
        plot_weight_distributions(run, out_dir)
    plot_diagnostics(runs, out_dir, accuracy=accuracy)
    plot_robustness_curves(runs, out_dir)
    return markdown


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Print the paper-style table of one or more workdirs and write it with plots.")
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/report "
                        "of the first workdir)")
    parser.add_argument("--accuracy", choices=tuple(ACCURACY_FIELDS), default="final",
                        help="accuracies of the final weights or of the early-stopped ones")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.workdirs, args.out, accuracy=args.accuracy))
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
