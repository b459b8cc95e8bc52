# Evaluation: generated sample sets -> the paper's tables (gem3d/evaluation/stages.py).
#   Table 1  evaluate_generation     FID-A/C/S of the baseline and every sampling set vs real training volumes
#   Table 2  evaluate_fidelity       MS-SSIM / LPIPS / PSNR / SSIM of the test sets vs the real test cases
#   Table 3  (evaluate_fidelity)     injection.csv: the rows of the feature-injection variants (`comparisons`)
#   Table 4  prepare_segmentation_<D>      nnU-Net dataset of training data D, preprocessed with the real row's plans
#            train_segmentation_<D>        nnU-Net v2 trained on D, one job per seed (parallel GPU jobs)
#            evaluate_adherence            the real-data nnU-Net's Dice of every generated volume against its mask
#            evaluate_segmentation         Dice / HD95 per region on the real test split, intervals over test cases
#            evaluate_privacy        nearest training volume of every generated volume, near copies flagged
# Set names come from gem3d/sampling/sets.py (SETS, imported by the Snakefile). Configured weights files
# (evaluation.fid_weights, lpips_*) are inputs of the rules that read them: a missing one fails the plan, and so
# does an unset fid_weights for an extractor that loads one.

EVAL_GENERATION_SETS = SETS.generation_sets(CFG)
EVAL_COPIES = SETS.enhancement_copies(CFG)
EVAL_TEST_SETS = SETS.test_sets(CFG)
EVAL_SEGMENTATION_SETS = SETS.downstream_sets(CFG)  # Table 4 training data -> its sample sets
EVAL_ROWS = SETS.downstream_rows(CFG)
EVAL_SEEDS = list(range(CFG.evaluation.segmentation.seeds))
EVAL_SEGMENTATION_METRICS = {
    (data, seed): P.evaluation / "segmentation" / data / f"seed{seed}" / "metrics.json"
    for data in EVAL_SEGMENTATION_SETS
    for seed in EVAL_SEEDS
}
EVAL_PREPARED = {  # a row's nnU-Net dataset, preprocessed (downstream.prepared_path)
    data: P.evaluation / "nnunet" / "preprocessed"
    / f"Dataset{CFG.preprocess.dataset_id + DOWNSTREAM_OFFSETS[data]:03d}_{CFG.name}_{data}"
    / "gem3d_signature.json"
    for data in EVAL_SEGMENTATION_SETS
}
EVAL_ADHERENCE_SETS = SETS.adherence_sets(CFG)
# a training's cores: its process and its augmentation workers (evaluation.segmentation.augmentation_processes)
EVAL_TRAIN_THREADS = 1 + (CFG.evaluation.segmentation.num_processes
                          if CFG.evaluation.segmentation.augmentation_processes is None
                          else CFG.evaluation.segmentation.augmentation_processes)
# what `rule all` needs from this file
EVALUATION_TARGETS = [
    P.tables / "generation_quality.csv",
    P.tables / "test_fidelity.csv",
    P.tables / "segmentation.csv",
    P.tables / "privacy.csv",
] + ([P.tables / "adherence.csv"] if EVAL_ADHERENCE_SETS else [])
EVAL_MANIFEST = {s: P.samples(s) / "manifest.json" for s in EVAL_GENERATION_SETS + EVAL_COPIES + EVAL_TEST_SETS}


rule evaluate_generation:
    input:
        manifests=[EVAL_MANIFEST[s] for s in EVAL_GENERATION_SETS],
        slices=P.slices / "index.json",
        weights=fid_weights_input,
    output:
        csv=P.tables / "generation_quality.csv",
        md=P.tables / "generation_quality.md",
    params:
        fingerprint=config_digest(CFG, "evaluate_generation"),
    threads: RESOURCES.job_threads(CFG, 4)
    resources:
        **job_resources("evaluate_generation"),
    log:
        P.log("evaluate_generation"),
    benchmark:
        P.benchmark("evaluate_generation")
    shell:
        "gem3d evaluate-generation --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule evaluate_fidelity:
    input:
        manifests=[EVAL_MANIFEST[s] for s in EVAL_TEST_SETS],
        slices=P.slices / "index.json",
        weights=weight_files("lpips_backbone_weights", "lpips_lin_weights"),
    output:
        csv=P.tables / "test_fidelity.csv",
        md=P.tables / "test_fidelity.md",
        injection=[P.tables / "injection.csv", P.tables / "injection.md"] if SETS.injection_sets(CFG) else [],
    params:
        fingerprint=config_digest(CFG, "evaluate_fidelity"),
    threads: RESOURCES.job_threads(CFG, 4)
    resources:
        **job_resources("evaluate_fidelity"),
    log:
        P.log("evaluate_fidelity"),
    benchmark:
        P.benchmark("evaluate_fidelity")
    shell:
        "gem3d evaluate-fidelity --config \"$GEM3D_CONFIG_FILE\" --log {log}"


for _data, _sets in EVAL_SEGMENTATION_SETS.items():

    rule:
        name:
            f"prepare_segmentation_{_data}"
        input:
            manifests=[EVAL_MANIFEST[s] for s in _sets],
            raw=P.raw_dataset / "dataset.json",
            split=P.split,
            real_plans=[] if _data == "real" else EVAL_PREPARED["real"],  # every row uses the real row's plans
            adherence=P.tables / "adherence.csv" if _data.endswith("_adherent") else [],
        output:
            EVAL_PREPARED[_data],
        params:
            fingerprint=config_digest(CFG, "prepare_segmentation"),
            row=repr(EVAL_ROWS[_data]),  # the row's own definition: adding a row reruns no other
            data=_data,
        threads: CFG.evaluation.segmentation.num_processes
        resources:
            **job_resources("prepare_segmentation", data=_data),
        log:
            P.log(f"prepare_segmentation_{_data}"),
        benchmark:
            P.benchmark(f"prepare_segmentation_{_data}")
        shell:
            "gem3d prepare-segmentation --data {params.data} --config \"$GEM3D_CONFIG_FILE\" --log {log}"

    rule:  # one job per seed (wildcard `seed`, 0 .. evaluation.segmentation.seeds - 1)
        name:
            f"train_segmentation_{_data}"
        input:
            EVAL_PREPARED[_data],
        output:
            metrics=P.evaluation / "segmentation" / _data / "seed{seed}" / "metrics.json",
        wildcard_constraints:
            seed=r"\d+",
        params:
            fingerprint=config_digest(CFG, "train_segmentation"),
            row=repr(EVAL_ROWS[_data]),  # the row's own definition: adding a row reruns no other
            data=_data,
        threads: EVAL_TRAIN_THREADS
        resources:
            **job_resources("train_segmentation", data=_data),
        log:
            P.log(f"train_segmentation_{_data}_seed{{seed}}"),
        benchmark:
            P.benchmark(f"train_segmentation_{_data}_seed{{seed}}")
        shell:
            "gem3d train-segmentation --data {params.data} --seed {wildcards.seed} --config \"$GEM3D_CONFIG_FILE\" "
            "--log {log}"


if EVAL_ADHERENCE_SETS:

    rule evaluate_adherence:
        input:
            model=EVAL_SEGMENTATION_METRICS[("real", 0)],
            manifests=[EVAL_MANIFEST[s] for s in EVAL_ADHERENCE_SETS],
        output:
            csv=P.tables / "adherence.csv",
            md=P.tables / "adherence.md",
            volumes=P.tables / "adherence_volumes.csv",
            volumes_md=P.tables / "adherence_volumes.md",
        params:
            fingerprint=config_digest(CFG, "evaluate_adherence"),
            sets=EVAL_ADHERENCE_SETS,
        threads: RESOURCES.job_threads(CFG, 2)
        resources:
            **job_resources("evaluate_adherence"),
        log:
            P.log("evaluate_adherence"),
        benchmark:
            P.benchmark("evaluate_adherence")
        shell:
            "gem3d evaluate-adherence --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule evaluate_segmentation:
    input:
        list(EVAL_SEGMENTATION_METRICS.values()),
    output:
        csv=P.tables / "segmentation.csv",
        md=P.tables / "segmentation.md",
        cases=P.tables / "segmentation_cases.csv",
    params:
        fingerprint=config_digest(CFG, "evaluate_segmentation"),
    resources:
        **job_resources("evaluate_segmentation"),
    log:
        P.log("evaluate_segmentation"),
    benchmark:
        P.benchmark("evaluate_segmentation")
    shell:
        "gem3d evaluate-segmentation --config \"$GEM3D_CONFIG_FILE\" --log {log}"


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
    params:
        fingerprint=config_digest(CFG, "evaluate_privacy"),
    threads: RESOURCES.job_threads(CFG, 2)
    resources:
        **job_resources("evaluate_privacy"),
    log:
        P.log("evaluate_privacy"),
    benchmark:
        P.benchmark("evaluate_privacy")
    shell:
        "gem3d evaluate-privacy --config \"$GEM3D_CONFIG_FILE\" --log {log}"
