# Evaluation: generated sample sets -> the paper's tables (gem3d/evaluation/stages.py).
#   Table 1  evaluate_generation     FID-A/C/S of the baseline and every sampling set vs real training volumes
#   Table 2  evaluate_fidelity       MS-SSIM / LPIPS / PSNR / SSIM of the test sets vs the real test cases
#   Table 4  train_segmentation_<D>  nnU-Net v2 trained on D (one rule per training data: parallel GPU jobs)
#            evaluate_segmentation   Dice / HD95 per region on the real test split
#            evaluate_privacy        nearest training volume of every generated volume, near copies flagged
# Set names come from gem3d/sampling/sets.py (SETS, imported by the Snakefile).

EVAL_GENERATION_SETS = SETS.generation_sets(CFG)
EVAL_COPIES = SETS.enhancement_copies(CFG)
EVAL_TEST_SETS = SETS.test_sets(CFG)
EVAL_SEGMENTATION_SETS = SETS.downstream_sets(CFG)  # Table 4 training data -> its sample sets
EVAL_SEGMENTATION_METRICS = {
    data: P.evaluation / "segmentation" / data / "metrics.json"
    for data in EVAL_SEGMENTATION_SETS
}
# what `rule all` needs from this file
EVALUATION_TARGETS = [
    P.tables / "generation_quality.csv",
    P.tables / "test_fidelity.csv",
    P.tables / "segmentation.csv",
    P.tables / "privacy.csv",
]
EVAL_MANIFEST = {s: P.samples(s) / "manifest.json" for s in EVAL_GENERATION_SETS + EVAL_COPIES + EVAL_TEST_SETS}


rule evaluate_generation:
    input:
        manifests=[EVAL_MANIFEST[s] for s in EVAL_GENERATION_SETS],
        slices=P.slices / "index.json",
    output:
        csv=P.tables / "generation_quality.csv",
        md=P.tables / "generation_quality.md",
    threads: 4
    resources:
        gpu=1,
    log:
        P.log("evaluate_generation"),
    benchmark:
        P.benchmark("evaluate_generation")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d evaluate-generation --config {params.config} --log {log}"


rule evaluate_fidelity:
    input:
        manifests=[EVAL_MANIFEST[s] for s in EVAL_TEST_SETS],
        slices=P.slices / "index.json",
    output:
        csv=P.tables / "test_fidelity.csv",
        md=P.tables / "test_fidelity.md",
    threads: 4
    resources:
        gpu=1,
    log:
        P.log("evaluate_fidelity"),
    benchmark:
        P.benchmark("evaluate_fidelity")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d evaluate-fidelity --config {params.config} --log {log}"


for _data, _sets in EVAL_SEGMENTATION_SETS.items():

    rule:
        name:
            f"train_segmentation_{_data}"
        input:
            manifests=[EVAL_MANIFEST[s] for s in _sets],
            raw=P.raw_dataset / "dataset.json",
            split=P.split,
        output:
            metrics=EVAL_SEGMENTATION_METRICS[_data],
        params:
            data=_data,
            config=CONFIG_FILE,
        threads: CFG.evaluation.segmentation.num_processes + 1
        resources:
            gpu=1,
        log:
            P.log(f"train_segmentation_{_data}"),
        benchmark:
            P.benchmark(f"train_segmentation_{_data}")
        conda:
            "../../envs/gem3d.yaml"
        shell:
            "gem3d train-segmentation --data {params.data} --config {params.config} --log {log}"


rule evaluate_segmentation:
    input:
        list(EVAL_SEGMENTATION_METRICS.values()),
    output:
        csv=P.tables / "segmentation.csv",
        md=P.tables / "segmentation.md",
    log:
        P.log("evaluate_segmentation"),
    benchmark:
        P.benchmark("evaluate_segmentation")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d evaluate-segmentation --config {params.config} --log {log}"


rule evaluate_privacy:
    input:
        manifests=[EVAL_MANIFEST[s] for s in EVAL_GENERATION_SETS + EVAL_COPIES],
        slices=P.slices / "index.json",
    output:
        csv=P.tables / "privacy.csv",
        md=P.tables / "privacy.md",
        training=P.tables / "privacy_training_nn.csv",
        training_md=P.tables / "privacy_training_nn.md",
        summary=P.tables / "privacy_summary.csv",
        summary_md=P.tables / "privacy_summary.md",
    threads: 2
    log:
        P.log("evaluate_privacy"),
    benchmark:
        P.benchmark("evaluate_privacy")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d evaluate-privacy --config {params.config} --log {log}"
