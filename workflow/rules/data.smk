# Data: synthetic demo phantoms -> import -> nnU-Net preprocessing -> slice store.


if CFG.phantoms is not None:

    rule make_phantoms:
        output:
            P.phantoms_manifest,
        log:
            P.log("make_phantoms"),
        benchmark:
            P.benchmark("make_phantoms")
        conda:
            "../../envs/gem3d.yaml"
        params:
            config=CONFIG_FILE,
        shell:
            "gem3d phantoms --config {params.config} --log {log}"


rule import_data:
    input:
        [P.phantoms_manifest] if CFG.phantoms is not None else [],
    output:
        dataset=P.raw_dataset / "dataset.json",
        split=P.split,
        report=P.import_report,
    log:
        P.log("import_data"),
    benchmark:
        P.benchmark("import_data")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d import --config {params.config} --log {log}"


rule preprocess_nnunet:
    input:
        P.raw_dataset / "dataset.json",
    output:
        P.preprocessed_dataset / "nnUNetPlans.json",
    threads: CFG.preprocess.num_processes
    log:
        P.log("preprocess_nnunet"),
    benchmark:
        P.benchmark("preprocess_nnunet")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d preprocess --config {params.config} --log {log}"


rule build_slices:
    input:
        plans=P.preprocessed_dataset / "nnUNetPlans.json",
        split=P.split,
    output:
        P.slices / "index.json",
    log:
        P.log("build_slices"),
    benchmark:
        P.benchmark("build_slices")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d slices --config {params.config} --log {log}"
