# Models: VAE -> latent cache -> slice LDM (IG), volume LDM stage 1 -> stage 2, and the baseline.
# GPU rules declare `gpu=1` (the slurm profile turns it into --gpus=1); they still run on CPU.
# Resumable training state lives in results/<name>/train_state/ (not an output: Snakemake must
# not delete it when a job is killed); rerunning the rule resumes from it.


rule train_vae:
    input:
        P.slices / "index.json",
    output:
        model=P.model("vae"),
        metrics=P.vae_metrics,
    threads: 4
    resources:
        gpu=1,
    log:
        P.log("train_vae"),
    benchmark:
        P.benchmark("train_vae")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d train-vae --config {params.config} --log {log}"


rule encode_latents:
    input:
        vae=P.model("vae"),
        slices=P.slices / "index.json",
    output:
        P.latents / "index.json",
    threads: 4
    resources:
        gpu=1,
    log:
        P.log("encode_latents"),
    benchmark:
        P.benchmark("encode_latents")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d encode --config {params.config} --log {log}"


rule train_slice_model:
    input:
        P.latents / "index.json",
    output:
        P.model("slice_model"),
    threads: 4
    resources:
        gpu=1,
    log:
        P.log("train_slice_model"),
    benchmark:
        P.benchmark("train_slice_model")
    conda:
        "../../envs/gem3d.yaml"
    params:
        config=CONFIG_FILE,
    shell:
        "gem3d train-slice --config {params.config} --log {log}"


rule train_volume_stage1:
    input:
        P.latents / "index.json",
    output:
        P.model("{variant}_stage1"),
    wildcard_constraints:
        variant="volume|baseline",
    params:
        config=CONFIG_FILE,
        model=lambda wc: "gem3d" if wc.variant == "volume" else "baseline",
    threads: 4
    resources:
        gpu=1,
    log:
        P.log("train_{variant}_stage1"),
    benchmark:
        P.benchmark("train_{variant}_stage1")
    conda:
        "../../envs/gem3d.yaml"
    shell:
        "gem3d train-volume --stage 1 --model {params.model} --config {params.config} --log {log}"


rule train_volume_stage2:
    input:
        latents=P.latents / "index.json",
        stage1=P.model("{variant}_stage1"),
    output:
        P.model("{variant}_stage2"),
    wildcard_constraints:
        variant="volume|baseline",
    params:
        config=CONFIG_FILE,
        model=lambda wc: "gem3d" if wc.variant == "volume" else "baseline",
    threads: 4
    resources:
        gpu=1,
    log:
        P.log("train_{variant}_stage2"),
    benchmark:
        P.benchmark("train_{variant}_stage2")
    conda:
        "../../envs/gem3d.yaml"
    shell:
        "gem3d train-volume --stage 2 --model {params.model} --config {params.config} --log {log}"
