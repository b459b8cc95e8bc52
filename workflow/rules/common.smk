# Functions of the rules (snakemake --lint: no functions next to rules).


def sample_inputs(wildcards):
    spec = SETS.set_spec(CFG, wildcards.set)
    method = REGISTRY.get(spec.variant)
    inputs = [P.latents / "index.json", *(P.model(m) for m in method.models(spec.stage))]
    if spec.informed == "IG":
        inputs.append(P.model("slice_model"))
    return inputs


def job_resources(rule, **fixed_wildcards):
    """Memory (MB), wall time (minutes) and GPUs of the jobs of `rule`, from gem3d/resources.py.

    Evaluated again just before a job is submitted (the run's split and latent cache give the data size
    then); a retry (`attempt` 2, ...) gets that many times the memory and time.
    """

    def size(wildcards, attempt):
        return RESOURCES.job_size(CFG, rule, P.root, {**fixed_wildcards, **dict(wildcards.items())}, attempt)

    return dict(
        mem_mb=lambda wildcards, attempt: size(wildcards, attempt).mem_mb,
        runtime=lambda wildcards, attempt: size(wildcards, attempt).runtime,
        gpu=RESOURCES.job_size(CFG, rule).gpu,
    )


def weight_files(*keys):
    """The configured local weights files among `evaluation.<key>`: inputs of the evaluations reading them."""
    return [getattr(CFG.evaluation, key) for key in keys if getattr(CFG.evaluation, key)]


def fid_weights_input(wildcards):
    """evaluate_generation's weights file. An extractor that loads one, with none set, fails every plan holding
    Table 1 (not the config's load: the default extractor needs a file, and the stages before it need none)."""
    ev = CFG.evaluation
    if ev.fid_extractor != "random_conv" and ev.fid_weights is None:
        raise WorkflowError(f"gem3d: {CFG.source}: evaluation.fid_weights is not set: the {ev.fid_extractor} "
                            "extractor of Table 1 loads a local weights file (nothing is downloaded; "
                            "evaluation.fid_extractor random_conv needs none)")
    return weight_files("fid_weights")


def generate_inputs(wildcards):
    """What `gem3d generate` reads: the masks, the dataset's plans and stores, the networks it samples with."""
    g = CFG.generation
    inputs = [g.masks, P.raw_dataset / "dataset.json", P.preprocessed_dataset / "nnUNetPlans.json",
              P.slices / "index.json", P.latents / "index.json", P.model("vae"), P.model("volume_stage2")]
    if g.informed_image:
        inputs.append(g.informed_image)
    elif g.informed == "IG":
        inputs.append(P.model("slice_model"))
    if g.region:
        inputs.append(g.region)
    return inputs


def variant_keys(rule):
    """A volume-stage rule's params: the digest of its keys and the variant's own (its registry Training's keys)."""

    def fingerprint(wildcards):
        method = WINDOW_METHODS[wildcards.variant]
        return config_digest(CFG, rule, next(t.keys for t in method.trainings if t.rule == rule))

    return fingerprint


def method_inputs(training):
    """The inputs of a method's own training job: its data (latent cache or slice store) and the model files it needs."""
    data = P.latents / "index.json" if training.reads == "latents" else P.slices / "index.json"
    return [data, *(P.model(m) for m in training.after)]

