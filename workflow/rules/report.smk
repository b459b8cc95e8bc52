# Report: the paper's figures (gem3d/report) and the evaluation tables rendered to HTML, all marked
# report() with a caption from workflow/report/. After a run:
#   snakemake --report results/<name>/report.html [--configfile ...]
#   figure_fig2_comparison        Fig. 2  test masks: real / baseline / GEM-3D
#   figure_fig3_counterfactual    Fig. 3  one mask x informed slices of other cases (generated here: GPU job)
#   figure_fig4_deenhancement     Fig. 4  real training volumes vs the de-enhanced set
#   figure_fig5_overlap_ablation  Fig. 5  consecutive slices across a window boundary, with / without pinning
#   figure_fig6_stage2_ablation   Fig. 6  coronal / sagittal views, stage 1 only vs stage 2
#   figure_fig7_samples           Fig. 7  generated slices beside their mask slices (training / augmented masks)
#   figure_training_curves        loss vs step of every network
#   figure_informed_fit           failure cases: IC informed slices that contradict their mask, with / without
#                                 the fit guard (slice store only)
#   render_tables                 tables/<table>.csv + .md -> report/tables/<table>.html
# Set names: gem3d/sampling/sets.py (SETS).

from gem3d import report as REPORT  # torch-free: figure and table names

REPORT_SYNTHETIC = CFG.phantoms is not None
REPORT_MODELS = SETS.trained_models(CFG)  # the training curves: networks given as files have none
REPORT_TABLES = list(REPORT.report_tables(CFG))  # gem3d/report/__init__.py: the injection table with its rows
REPORT_TABLE_DIR = P.root / "report" / "tables"


REPORT_FIGURE_SETS = {
    "fig2_comparison": list(SETS.figure_sets(CFG)),  # the methods' Fig. 2 columns (gem3d/methods/registry.py)
    "fig4_deenhancement": ["deenhanced"],
    "fig5_overlap_ablation": ["test_gem3d", "test_no_overlap"],
    "fig6_stage2_ablation": ["test_gem3d", "test_no_stage2"],
    "fig7_samples": list(CFG.sampling.sets),
}
REPORT_FIGURE_INPUTS = {
    **{f: [P.samples(s) / "manifest.json" for s in sets] for f, sets in REPORT_FIGURE_SETS.items()},
    "training_curves": [P.model(m) for m in REPORT_MODELS],
    "informed_fit": [],  # the slice store only (every figure's input below)
    "downstream": [P.tables / "segmentation.csv"],
    "segmentation_curves": [
        P.evaluation / "segmentation" / d / f"seed{s}" / "metrics.json"
        for d in SETS.downstream_rows(CFG)
        for s in range(CFG.evaluation.segmentation.seeds)
    ],
    "adherence": [P.tables / "adherence_volumes.csv"],
}
REPORT_FIGURE_TITLES = {
    "fig2_comparison": "Fig. 2 comparison",
    "fig3_counterfactual": "Fig. 3 counterfactual",
    "fig4_deenhancement": "Fig. 4 de-enhancement",
    "fig5_overlap_ablation": "Fig. 5 overlapped inpainting",
    "fig6_stage2_ablation": "Fig. 6 volumetric tuning",
    "fig7_samples": "Fig. 7 generated slices and masks",
    "training_curves": "Training curves",
    "informed_fit": "Failure cases (informed-slice fit)",
    "downstream": "Downstream Dice against copies",
    "segmentation_curves": "Downstream training curves",
    "adherence": "Mask adherence",
}
REPORT_SUBCATEGORY = {"training_curves": "Training", "downstream": "Downstream study",
                      "segmentation_curves": "Downstream study", "adherence": "Downstream study"}
# what `rule all` needs from this file
REPORT_TARGETS = (
    [P.figures / f"{f}.{ext}" for f in REPORT_FIGURE_TITLES for ext in ("png", "pdf")]
    + [P.figures / "fig3_counterfactual.json"]
    + [REPORT_TABLE_DIR / f"{t}.html" for t in REPORT_TABLES]
)


for _fig, _inputs in REPORT_FIGURE_INPUTS.items():

    rule:
        name:
            f"figure_{_fig}"
        input:
            _inputs,
            slices=P.slices / "index.json",
        output:
            png=report(
                P.figures / f"{_fig}.png",
                caption=f"../report/{_fig}.rst",
                category="Figures",
                subcategory=REPORT_SUBCATEGORY.get(_fig, "Paper figures"),
                labels={"figure": REPORT_FIGURE_TITLES[_fig], "format": "PNG"},
            ),
            pdf=P.figures / f"{_fig}.pdf",
        params:
            fingerprint=config_digest(CFG, f"figure_{_fig}"),
            figure=_fig,
            synthetic=REPORT_SYNTHETIC,
        resources:
            **job_resources(f"figure_{_fig}"),
        log:
            P.log(f"figure_{_fig}"),
        benchmark:
            P.benchmark(f"figure_{_fig}")
        shell:
            "gem3d figure --name {params.figure} --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule figure_fig3_counterfactual:
    input:
        vae=P.model("vae"),
        model=P.model("volume_stage2"),
        latents=P.latents / "index.json",
        slices=P.slices / "index.json",
    output:
        png=report(
            P.figures / "fig3_counterfactual.png",
            caption="../report/fig3_counterfactual.rst",
            category="Figures",
            subcategory="Paper figures",
            labels={"figure": REPORT_FIGURE_TITLES["fig3_counterfactual"], "format": "PNG"},
        ),
        pdf=P.figures / "fig3_counterfactual.pdf",
        provenance=P.figures / "fig3_counterfactual.json",
    params:
        fingerprint=config_digest(CFG, "figure_fig3_counterfactual"),
        synthetic=REPORT_SYNTHETIC,
    threads: RESOURCES.job_threads(CFG, 4)
    resources:
        **job_resources("figure_fig3_counterfactual"),
    log:
        P.log("figure_fig3_counterfactual"),
    benchmark:
        P.benchmark("figure_fig3_counterfactual")
    shell:
        "gem3d figure --name fig3_counterfactual --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule render_tables:
    input:
        csv=[P.tables / f"{t}.csv" for t in REPORT_TABLES],
        md=[P.tables / f"{t}.md" for t in REPORT_TABLES],
    output:
        [
            report(
                REPORT_TABLE_DIR / f"{t}.html",
                caption=f"../report/table_{t}.rst",
                category="Tables",
                labels={"table": t.replace("_", " ")},
            )
            for t in REPORT_TABLES
        ],
    params:
        fingerprint=config_digest(CFG, "render_tables"),
        synthetic=REPORT_SYNTHETIC,
    resources:
        **job_resources("render_tables"),
    log:
        P.log("render_tables"),
    benchmark:
        P.benchmark("render_tables")
    shell:
        "gem3d render-tables --config \"$GEM3D_CONFIG_FILE\" --log {log}"
