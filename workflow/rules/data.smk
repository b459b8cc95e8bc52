# Data: synthetic demo phantoms -> import -> nnU-Net preprocessing -> slice store.
# Every rule: `params: fingerprint` = digest of the config keys it reads (gem3d/fingerprint.py), resources
# from gem3d/resources.py (common.smk: job_resources).


if CFG.phantoms is not None:

    rule make_phantoms:
        output:
            P.phantoms_manifest,
        params:
            fingerprint=config_digest(CFG, "make_phantoms"),
        resources:
            **job_resources("make_phantoms"),
        log:
            P.log("make_phantoms"),
        benchmark:
            P.benchmark("make_phantoms")
        shell:
            "gem3d phantoms --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule import_data:
    input:
        [P.phantoms_manifest] if CFG.phantoms is not None else [],
        [CFG.data.split] if isinstance(CFG.data.split, str) else [],  # a user's split file
    # update(): Snakemake keeps the previous dataset while the job runs (gem3d swaps the new one in whole,
    # so a failed re-import leaves the old dataset complete instead of a dataset.json Snakemake deleted)
    output:
        dataset=update(P.raw_dataset / "dataset.json"),
        split=update(P.split),
        report=update(P.import_report),
    params:
        fingerprint=config_digest(CFG, "import_data"),
        data=input_digest(CFG, P.input_digest_cache),  # the input cases' content (gem3d/data/input_digest.py)
    resources:
        **job_resources("import_data"),
    log:
        P.log("import_data"),
    benchmark:
        P.benchmark("import_data")
    shell:
        "gem3d import --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule preprocess_nnunet:
    input:
        P.raw_dataset / "dataset.json",
        P.split,  # nnU-Net plans from the training cases only
    output:
        P.preprocessed_dataset / "nnUNetPlans.json",
    params:
        fingerprint=config_digest(CFG, "preprocess_nnunet"),
    threads: CFG.preprocess.num_processes
    resources:
        **job_resources("preprocess_nnunet"),
    log:
        P.log("preprocess_nnunet"),
    benchmark:
        P.benchmark("preprocess_nnunet")
    shell:
        "gem3d preprocess --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule build_slices:
    input:
        plans=P.preprocessed_dataset / "nnUNetPlans.json",
        split=P.split,
    output:
        P.slices / "index.json",
    params:
        fingerprint=config_digest(CFG, "build_slices"),
    resources:
        **job_resources("build_slices"),
    log:
        P.log("build_slices"),
    benchmark:
        P.benchmark("build_slices")
    shell:
        "gem3d slices --config \"$GEM3D_CONFIG_FILE\" --log {log}"
