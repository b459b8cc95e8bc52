# Input functions of the rules (snakemake --lint: no functions next to rules).


def sample_inputs(wildcards):
    spec = SETS.set_spec(CFG, wildcards.set)
    variant = "volume" if spec.variant == "gem3d" else "baseline"
    inputs = [P.latents / "index.json", P.model(f"{variant}_stage{spec.stage}")]
    if spec.informed == "IG":
        inputs.append(P.model("slice_model"))
    return inputs
