# Sampling: every sample set is generated in `sampling.shards` shards (GPU jobs), then merged. With one
# shard the sampling job writes the set itself (`gem3d sample` merges a lone shard), no merge job (#26).
# Sets: baseline, IC, IC_MA, IG, IG_MA (training masks), copies of the enhancement set for the
# 1x/2x/3x datasets, test reconstructions (true informed slice; ablations), de-enhancement.

SHARDS = CFG.sampling.shards
SHARD = "{set}.{shard}of{shards}" if SHARDS > 1 else "{set}.0of1"


rule sample_shard:
    input:
        sample_inputs,
    output:
        P.root / "samples" / "shards" / SHARD / "manifest.json",
        *([P.root / "samples" / "{set}" / "manifest.json"] if SHARDS == 1 else []),
    wildcard_constraints:
        set="[A-Za-z0-9_]+",
        shard="[0-9]+",
        shards="[0-9]+",
    params:
        fingerprint=lambda wc: config_digest(CFG, "sample_shard", SETS.set_config_keys(CFG, wc.set)),  # what it reads
        shard=lambda wc: wc.get("shard", 0),  # one shard: the output names no shard wildcards
        shards=lambda wc: wc.get("shards", 1),
    threads: RESOURCES.job_threads(CFG, 4)
    resources:
        **job_resources("sample_shard"),
    log:
        P.log(f"sample_shard/{SHARD}"),
    benchmark:
        P.benchmark(f"sample_shard/{SHARD}")
    shell:
        "gem3d sample --set {wildcards.set} --shard {params.shard} --shards {params.shards} "
        "--config \"$GEM3D_CONFIG_FILE\" --log {log}"


if SHARDS > 1:

    rule merge_samples:
        input:
            lambda wc: [P.root / "samples" / "shards" / f"{wc.set}.{i}of{SHARDS}" / "manifest.json" for i in range(SHARDS)],
        output:
            P.root / "samples" / "{set}" / "manifest.json",
        wildcard_constraints:
            set="[A-Za-z0-9_]+",
        params:
            fingerprint=config_digest(CFG, "merge_samples"),
            shards=SHARDS,
        resources:
            **job_resources("merge_samples"),
        log:
            P.log("merge_samples/{set}"),
        benchmark:
            P.benchmark("merge_samples/{set}")
        shell:
            "gem3d merge-samples --set {wildcards.set} --shards {params.shards} --config \"$GEM3D_CONFIG_FILE\" --log {log}"


# Images for masks of your own (generation.masks): `gem3d generate`, one job per shard (README: "Generate
# images for your own masks"). Target: generate_all.
if CFG.generation.masks:
    GEN_SHARDS = CFG.generation.shards

    rule generate:
        input:
            generate_inputs,
        output:
            P.root / "generated" / "manifest.{shard}of{shards}.json",
        wildcard_constraints:
            shard="[0-9]+",
            shards="[0-9]+",
        params:
            fingerprint=config_digest(CFG, "generate"),
            # the content of the masks (a folder is an input by its time only), region and informed image
            inputs=content_digest({"masks": CFG.generation.masks, "region": CFG.generation.region,
                                   "informed_image": CFG.generation.informed_image}, P.generate_digest_cache),
        threads: RESOURCES.job_threads(CFG, 4)
        resources:
            **job_resources("generate"),
        log:
            P.log("generate/{shard}of{shards}"),
        benchmark:
            P.benchmark("generate/{shard}of{shards}")
        shell:
            "gem3d generate --shard {wildcards.shard} --shards {wildcards.shards} "
            "--config \"$GEM3D_CONFIG_FILE\" --log {log}"

    rule generate_all:
        input:
            [P.root / "generated" / f"manifest.{i}of{GEN_SHARDS}.json" for i in range(GEN_SHARDS)],
