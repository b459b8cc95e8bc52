"""`gem3d figure --name NAME` and `gem3d render-tables`: the report stages."""

from __future__ import annotations

import logging

from gem3d.commands import Arg, Command
from gem3d.config import Config
from gem3d.report import FIGURES, INJECTION_TABLE, TABLES, report_tables

log = logging.getLogger("gem3d.report")


def draw_figure(cfg: Config, name: str) -> list:
    """Draw one figure (or "all") into results/<name>/figures/<figure>.{png,pdf}."""
    from gem3d.report import counterfactual, curves, downstream, figures, informed_fit

    funcs = {"fig2_comparison": figures.fig2_comparison, "fig3_counterfactual": counterfactual.fig3_counterfactual,
             "fig4_deenhancement": figures.fig4_deenhancement, "fig5_overlap_ablation": figures.fig5_overlap_ablation,
             "fig6_stage2_ablation": figures.fig6_stage2_ablation, "fig7_samples": figures.fig7_samples,
             "training_curves": curves.training_curves,
             "informed_fit": informed_fit.informed_fit, "downstream": downstream.downstream,
             "segmentation_curves": downstream.segmentation_curves, "adherence": downstream.adherence}
    written = []
    for figure in (FIGURES if name == "all" else (name,)):
        paths = funcs[figure](cfg)
        log.info("figure %s -> %s", figure, ", ".join(str(p) for p in paths))
        written += paths
    return written


def render_tables(cfg: Config, names: list[str] | None = None) -> None:
    """Render the evaluation tables (tables/<table>.csv + .md) to report/tables/<table>.html."""
    from gem3d.report.tables import render_tables as render

    for path in render(cfg, tuple(names) if names else report_tables(cfg)):
        log.info("table -> %s", path)


COMMANDS = {
    "figure": Command(draw_figure, "draw one figure of the paper (or all) as PNG and PDF under results/<name>/figures",
                      args=(Arg(("--name",), dict(required=True, choices=FIGURES + ("all",), dest="name",
                                                  help="figure to draw")),),
                      needs_data_path=False),
    "render-tables": Command(render_tables, "render the evaluation tables to HTML for the Snakemake report",
                             args=(Arg(("--table",), dict(action="append", choices=TABLES + (INJECTION_TABLE,), dest="names",
                                                          help="table to render (repeatable; default: all)")),),
                             needs_data_path=False),
}
