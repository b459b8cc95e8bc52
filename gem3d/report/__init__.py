"""Figures and report tables (the paper's Figs. 2-7, training curves, HTML renderings of the tables).

Every figure is drawn from files that earlier stages wrote, in the slice store's slice space
(axis 0 = slice axis), and saved as PNG and PDF under ``Paths(cfg).figures`` through
``gem3d.io.atomic_path``:

    fig2_comparison          mask / real / baseline (/ 3D Pix2Pix / 3D LDM / the other methods with a Fig. 2 title
                             in gem3d/methods/registry.py) / GEM-3D on test cases (2 axial, coronal, sagittal)
    fig3_counterfactual      one mask (and an augmented copy) x informed slices of other cases
    fig4_deenhancement       real training volumes of several scanners vs their de-enhanced versions
    fig5_overlap_ablation    three consecutive slices across a window boundary, with / without pinning
    fig6_stage2_ablation     coronal / sagittal views, stage 1 only vs stage 2 (volumetric tuning)
    fig7_samples             generated axial slices beside their mask slices: training cases x the sets of
                             sampling.sets (training and augmented masks)
    training_curves          loss vs step of every trained network
    informed_fit             failure cases: the worst IC informed slices for their mask, with / without the
                             fit guard (gem3d/report/informed_fit.py; the paper's last figure)
    downstream               downstream Dice against generated copies, with intervals (gem3d/report/downstream.py)
    segmentation_curves      validation pseudo-Dice per epoch of every downstream nnU-Net training
    adherence                mask adherence of the generated volumes (the real-data nnU-Net's Dice), per set

`gem3d figure --name NAME` (gem3d/report/stages.py) draws one; `gem3d render-tables` turns the
evaluation tables into HTML for `snakemake --report`.
"""

FIGURES = ("fig2_comparison", "fig3_counterfactual", "fig4_deenhancement", "fig5_overlap_ablation",
           "fig6_stage2_ablation", "fig7_samples", "training_curves", "informed_fit", "downstream",
           "segmentation_curves", "adherence")
# evaluation tables (results/<name>/tables/<table>.csv and .md, gem3d/evaluation) rendered for the report
TABLES = ("generation_quality", "test_fidelity", "segmentation", "adherence", "privacy", "privacy_summary",
          "privacy_training_nn")
INJECTION_TABLE = "injection"  # Table 3, when `comparisons` trains an injection variant (report_tables)


def report_tables(cfg) -> tuple[str, ...]:
    """The tables of this config's report: TABLES, and the injection table when its rows exist."""
    from gem3d.sampling.sets import injection_sets

    return TABLES + ((INJECTION_TABLE,) if injection_sets(cfg) else ())
