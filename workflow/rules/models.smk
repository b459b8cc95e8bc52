# Models: VAE -> latent cache -> slice LDM (IG), volume LDM stage 1 -> stage 2, the baseline, and the
# paper's other methods when `comparisons` lists them (the injection variants controlnet/crossattn of the
# volume LDM, 3D Pix2Pix, the conditional 3D LDM).
# GPU rules get `gpu=1` from gem3d/resources.py (the slurm profile turns it into --gpus=1); they still
# run on CPU. Resumable training state lives in results/<name>/train_state/ (not an output: Snakemake
# must not delete it when a job is killed); rerunning the rule resumes from it.


rule train_vae:
    input:
        P.slices / "index.json",
        lpips=[CFG.vae.perceptual_vgg_weights] if CFG.vae.perceptual_weight > 0 and not CFG.vae.pretrained else [],
        pretrained=PRETRAINED.input_files(CFG.vae.pretrained),
    output:
        model=P.model("vae"),
        metrics=P.vae_metrics,
    params:
        fingerprint=config_digest(CFG, "train_vae"),
    threads: RESOURCES.job_threads(CFG, 4)
    resources:
        **job_resources("train_vae"),
    log:
        P.log("train_vae"),
    benchmark:
        P.benchmark("train_vae")
    shell:
        "gem3d train-vae --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule encode_latents:
    input:
        vae=P.model("vae"),
        slices=P.slices / "index.json",
    output:
        P.latents / "index.json",
    params:
        fingerprint=config_digest(CFG, "encode_latents"),
    threads: RESOURCES.job_threads(CFG, 4)
    resources:
        **job_resources("encode_latents"),
    log:
        P.log("encode_latents"),
    benchmark:
        P.benchmark("encode_latents")
    shell:
        "gem3d encode --config \"$GEM3D_CONFIG_FILE\" --log {log}"


if PRETRAINED_MODELS:  # networks given as files (`*.pretrained` keys): imported, not trained

    rule import_network:
        input:
            files=lambda wc: PRETRAINED.input_files(CFG.pretrained(wc.model)),
            vae=P.model("vae"),
        output:
            P.model("{model}"),
        wildcard_constraints:
            model="|".join(PRETRAINED_MODELS),
        params:
            fingerprint=lambda wc: import_digest(CFG, wc.model),
        threads: RESOURCES.job_threads(CFG, 2)
        resources:
            **job_resources("import_network"),
        log:
            P.log("import_{model}"),
        benchmark:
            P.benchmark("import_{model}")
        shell:
            "gem3d import-network --model {wildcards.model} --config \"$GEM3D_CONFIG_FILE\" --log {log}"


if "slice_model" not in PRETRAINED_MODELS:

    rule train_slice_model:
        input:
            P.latents / "index.json",
        output:
            P.model("slice_model"),
        params:
            fingerprint=config_digest(CFG, "train_slice_model"),
        threads: RESOURCES.job_threads(CFG, 4)
        resources:
            **job_resources("train_slice_model"),
        log:
            P.log("train_slice_model"),
        benchmark:
            P.benchmark("train_slice_model")
        shell:
            "gem3d train-slice --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule train_volume_stage1:
    input:
        P.latents / "index.json",
    output:
        P.model("{variant}_stage1"),
    wildcard_constraints:
        variant=TRAINED_VARIANTS[1],
    params:
        fingerprint=variant_keys("train_volume_stage1"),
        model=lambda wc: WINDOW_METHODS[wc.variant].name,
    threads: RESOURCES.job_threads(CFG, 4)
    resources:
        **job_resources("train_volume_stage1"),
    log:
        P.log("train_{variant}_stage1"),
    benchmark:
        P.benchmark("train_{variant}_stage1")
    shell:
        "gem3d train-volume --stage 1 --model {params.model} --config \"$GEM3D_CONFIG_FILE\" --log {log}"


rule train_volume_stage2:
    input:
        latents=P.latents / "index.json",
        stage1=P.model("{variant}_stage1"),
    output:
        P.model("{variant}_stage2"),
    wildcard_constraints:
        variant=TRAINED_VARIANTS[2],
    params:
        fingerprint=variant_keys("train_volume_stage2"),
        model=lambda wc: WINDOW_METHODS[wc.variant].name,
    threads: RESOURCES.job_threads(CFG, 4)
    resources:
        **job_resources("train_volume_stage2"),
    log:
        P.log("train_{variant}_stage2"),
    benchmark:
        P.benchmark("train_{variant}_stage2")
    shell:
        "gem3d train-volume --stage 2 --model {params.model} --config \"$GEM3D_CONFIG_FILE\" --log {log}"


# The generation methods with a training rule of their own (3D Pix2Pix, the conditional 3D LDM, methods of
# `method_modules`): one rule per model file of their registry entries (gem3d/methods/registry.py). The command is
# a param: a `shell:` expression is evaluated when the job runs, when the loop variables hold the last method.
for _method in REGISTRY.METHODS.values():
    for _training in [t for t in _method.trainings if not t.stage]:

        rule:
            name:
                _training.rule
            input:
                method_inputs(_training),
            output:
                P.model(_training.model),
            params:
                fingerprint=config_digest(CFG, _training.rule),
                command=_training.command or f"train-method --method {_method.name} --model {_training.model}",
            threads: RESOURCES.job_threads(CFG, 4)
            resources:
                **job_resources(_training.rule),
            log:
                P.log(_training.rule),
            benchmark:
                P.benchmark(_training.rule)
            shell:
                "gem3d {params.command} --config \"$GEM3D_CONFIG_FILE\" --log {log}"
