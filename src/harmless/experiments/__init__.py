"""Experiment scripts that reproduce the paper's results; they sit on the applications and
the core, and write markdown tables and PNG figures."""

from __future__ import annotations

from pathlib import Path

from harmless.errors import InputError

EXPERIMENTS = ("fig2", "table1", "fig3", "fig4", "fig5", "table2", "table2-overlap", "lemma1", "robustness")


def run_experiment(name: str, *, out_dir: Path, quick: bool = False, data_dir: str | None = None) -> list[Path]:
    """Run one experiment (or ``all``) and return the files it wrote."""
    if name == "all":
        return [p for e in EXPERIMENTS for p in run_experiment(e, out_dir=out_dir, quick=quick, data_dir=data_dir)]
    if name == "fig2":
        from harmless.experiments.fig2 import run
        return run(out_dir, quick=quick, data_dir=data_dir)
    if name == "table1":
        from harmless.experiments.exactness import run_table1
        return run_table1(out_dir, quick=quick, data_dir=data_dir)
    if name == "fig3":
        from harmless.experiments.exactness import run_fig3
        return run_fig3(out_dir, quick=quick, data_dir=data_dir)
    if name == "fig4":
        from harmless.experiments.fig4 import run as run_fig4
        return run_fig4(out_dir, quick=quick, data_dir=data_dir)
    if name == "fig5":
        from harmless.experiments.fig5 import run as run_fig5
        return run_fig5(out_dir, quick=quick, data_dir=data_dir)
    if name == "table2":
        from harmless.experiments.table2 import run as run_table2
        return run_table2(out_dir, quick=quick, data_dir=data_dir)
    if name == "table2-overlap":
        from harmless.experiments.table2_overlap import run as run_table2_overlap
        return run_table2_overlap(out_dir, quick=quick, data_dir=data_dir)
    if name == "lemma1":
        from harmless.experiments.lemma1 import run as run_lemma1
        return run_lemma1(out_dir, quick=quick)
    if name == "robustness":
        from harmless.experiments.robustness import run as run_robustness
        return run_robustness(out_dir, quick=quick, data_dir=data_dir)
    raise InputError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or all")
