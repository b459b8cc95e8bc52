"""Job sizes of the Snakemake rules: host memory (MB), wall time (minutes) and GPUs, from the config.

The one place that turns a config into the `resources:` of every rule (workflow/rules/common.smk
calls `job_size`); a SLURM profile's `set-resources` overrides any of them per rule.

    runtime = OVERHEAD_MIN + SAFETY * (seconds of work) / 60, at least MIN_RUNTIME_MIN
              (x attempt, except for the trainings: a retry resumes them from their last checkpoint)
    mem_mb  = (base + data held in memory), x attempt

Seconds of work: training steps x the step time of the network at its size; nnU-Net epochs x
iterations x NNUNET_ITERATION_S; sampled volumes x DDIM steps x windows x the window step time.
A network's step time is its time in the measured setup (`REFERENCE`: the paper's networks and slice
size, one window per volume-model step) scaled by the convolution work of one step at this config
(`conv_work`: batch x width^2 x pixels summed over the UNet levels; a batch of 8 windows costs 8 windows
on the one GPU a job gets), and never below the step time measured for the demo config on 2 CPU
cores (small networks are launch-bound, and the demo then gets its own measured time).

Where the constants come from:
- PAPER_STEP_S: volume stage 1 and 2 are the authors' implementation timed on one H100 in the
  REFERENCE setup (fp32, gradient checkpointing, one 16-slice window of 64x64 latents): 185 and 294 ms
  per step without the VAE encoding they add per step (gem3d trains on cached latents). The slice
  model and the VAE were not timed on a GPU: the stage-1 time scaled by their counted FLOPs per step
  (docs/benchmarks.md: 19.4 and 87.1 against 9.72 TFLOP). WINDOW_STEP_S (sampling) is the authors'
  stage-2 network timed the same way: 70 ms per 16-slice window step (fp32), which gives their
  measured 170 s per 155-slice volume at 200 DDIM steps. ENCODE_SLICE_S: 2 x 1.115 TFLOP (image and
  mask through the encoder, docs/benchmarks.md) at the 52.5 TFLOP/s of the stage-1 step.
- DEMO_STEP_S: wall time / steps of the demo's training rules on 2 CPU cores (docs/benchmarks.md).
- NNUNET_ITERATION_S: nnU-Net 3d_fullres on one GPU, 1000 epochs of 250 + 50 iterations in about
  a day (0.29 s per iteration), rounded up for slower cards.
- The per-case and per-volume seconds of the data, encoding and evaluation stages and every memory
  figure are estimates (not measured on a GPU); SAFETY and the retry (x attempt) cover them. So are the
  seconds per training item of the generation methods with a rule of their own (their registry entry's
  `Training.item_seconds`: 3D Pix2Pix, the conditional 3D LDM, ...); the injection variants (controlnet,
  crossattn) get the volume model's.

Threads (`job_threads`): a rule that runs torch asks for 4 threads, or 1 when the config's networks are
CPU-scale (every network under CPU_SCALE_WORK of the paper's convolution work per step: the demo, the CPU
configs). Such networks are launch-bound and two threads barely help, while two 1-thread jobs side by side on
2 cores do twice the work, and a 2-thread job beside any other work slows down many times over (measured with
scripts/bench_training.py, docs/benchmarks.md "Threads per job"). `snakemake --set-threads rule=N` overrides.

The size of the data (cases, slices per case) is read from the run's split and latent cache once they
exist; before that (a dry run before import) it comes from the config (`data.max_cases`, the phantoms)
or DEFAULT_CASES / DEFAULT_DEPTH. Snakemake evaluates resources again just before it submits a job,
when the earlier stages' files are there.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gem3d.config import Config
from gem3d.methods import registry

SAFETY = 1.5
OVERHEAD_MIN = 10  # start-up, model loading and saving, the VAE's scale factor and test metrics
MIN_RUNTIME_MIN = 15
PAPER_STEP_S = {"vae": 1.66, "slice_model": 0.37, "volume_stage1": 0.185, "volume_stage2": 0.294}
DEMO_STEP_S = {"vae": 72 / 1500, "slice_model": 48 / 1500, "volume_stage1": 126 / 3000, "volume_stage2": 64 / 1000}
WINDOW_STEP_S = 0.070  # one DDIM step of one 16-slice window, paper network, H100
ENCODE_SLICE_S = 0.045  # one 512x512 slice and its mask through the paper VAE's encoder, H100
NNUNET_ITERATION_S = 0.4
NNUNET_PREPROCESS_CASE_S = 20.0  # nnU-Net fingerprint + preprocessing of one case, one process
PREDICT_CASE_S = 10.0  # nnU-Net prediction of one test case
IMPORT_CASE_S = 3.0  # read, check and write one case (import, slice store)
EVAL_VOLUME_S = 3.0  # read one generated volume and compute its FID features or paired metrics (GPU)
PRIVACY_VOLUME_S = 1.0  # read one generated volume and compare it with the training volumes (CPU)
DEFAULT_CASES = 1250  # BraTS 2021 has 1251 cases, AbdomenCT-1K 1000
DEFAULT_DEPTH = 160  # slices per case (BraTS: 155)
BASE_MEM_MB = 2000  # Python, torch and gem3d
GPU_HOST_MEM_MB = 3000  # CUDA runtime and pinned buffers in host memory
NNUNET_WORKER_MEM_MB = 2500  # one nnU-Net preprocessing or data-augmentation process
CPU_SCALE_WORK = 1e-3  # below this fraction of the paper's work per training step a network is "CPU-scale"
IMPORT_MB = 8000  # a paper-size release checkpoint read whole (368M weights, their average and AdamW's moments)

# the built-in methods' own training rules (train_pix2pix, train_ldm3d; a method_modules one's: `_own_training`)
OWN_TRAININGS = tuple(t for m in registry.BUILT_IN for t in m.trainings if not t.stage)
GPU_RULES = ("train_vae", "encode_latents", "train_slice_model", "train_volume_stage1", "train_volume_stage2",
             *(t.rule for t in OWN_TRAININGS if t.gpu), "sample_shard", "evaluate_generation", "evaluate_fidelity",
             "train_segmentation", "evaluate_adherence", "figure_fig3_counterfactual", "generate")
RESUMABLE = ("train_vae", "train_slice_model", "train_volume_stage1", "train_volume_stage2",
             *(t.rule for t in OWN_TRAININGS), "train_segmentation")  # the shared loop resumes every training
NETWORK = {"train_vae": "vae", "train_slice_model": "slice_model", "train_volume_stage1": "volume_stage1",
           "train_volume_stage2": "volume_stage2"}  # training rule -> network


@dataclass(frozen=True)
class JobSize:
    mem_mb: int
    runtime: int  # minutes
    gpu: int


@dataclass(frozen=True)
class DataSize:
    n_train: int
    n_test: int
    depth: int  # slices per case (the largest)


def _unet_work(model: dict, side: float, items: float) -> float:
    width = model["model_channels"] if "model_channels" in model else model["base_channels"]
    levels = sum((width * m) ** 2 * (side / 2 ** i) ** 2 for i, m in enumerate(model["channel_mult"]))
    return items * model["num_res_blocks"] * levels


def _latent_side(cfg: Config) -> float:
    from gem3d.models import specs

    return cfg.preprocess.slice_size / 2 ** (len(specs.vae_config(cfg).channel_mult) - 1)


def conv_work(cfg: Config, network: str) -> float:
    """Convolution work of one training step of `network` (vae, slice_model, volume_stage1/2, and
    "volume_window": one forward pass over one window), in an arbitrary unit."""
    from gem3d.models import specs

    if network == "vae":
        return _unet_work(vars(specs.vae_config(cfg)), cfg.preprocess.slice_size, cfg.vae.train["batch_size"])
    if network == "slice_model":
        return _unet_work(vars(specs.slice_unet_config(cfg)), _latent_side(cfg), cfg.slice_model.train["batch_size"])
    batch = {"volume_stage1": cfg.volume_model.stage1["batch_size"], "volume_stage2": cfg.volume_model.stage2["batch_size"],
             "volume_window": 1}[network]
    model = vars(specs.volume_unet_config(cfg, informed=True))
    return _unet_work(model, _latent_side(cfg), batch * cfg.volume_model.window)


# The setup PAPER_STEP_S and WINDOW_STEP_S were measured (or their FLOPs counted) at: the paper's networks
# on 512x512 slices with an f=8 VAE; 8 slices per VAE step, 16 per slice-model step, one 16-slice window
# per volume-model step.
REFERENCE = {
    "preprocess": {"slice_size": 512},
    "vae": {"model": {"base_channels": 128, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2, "latent_channels": 4},
            "train": {"batch_size": 8}},
    "slice_model": {"model": {"model_channels": 224, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                              "attention_levels": [0, 1, 2], "head_dim": 32}, "train": {"batch_size": 16}},
    "volume_model": {"window": 16, "model": {"model_channels": 224, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 2,
                                             "attention_levels": [1, 2, 3], "head_dim": 32, "ff_mult": 0},
                     "stage1": {"batch_size": 1}, "stage2": {"batch_size": 1}},
}


@lru_cache(maxsize=1)
def _paper() -> Config:
    from gem3d.config import config_from_dict

    return config_from_dict({"name": "reference", "data": {"format": "brats", "path": ".",
                                                           "labels": {"background": 0, "tumour": 1}}, **REFERENCE},
                            source="<gem3d.resources.REFERENCE>", check_paths=False)


def step_seconds(cfg: Config, network: str) -> float:
    """Seconds per training step of `network` at this config's sizes (see the module docstring)."""
    scaled = PAPER_STEP_S[network] * conv_work(cfg, network) / conv_work(_paper(), network)
    return max(scaled, DEMO_STEP_S[network])


def cpu_scale(cfg: Config) -> bool:
    """Whether every network of the config is CPU-scale (under CPU_SCALE_WORK of the paper's step work)."""
    return all(conv_work(cfg, n) < CPU_SCALE_WORK * conv_work(_paper(), n)
               for n in ("vae", "slice_model", "volume_stage1"))


def job_threads(cfg: Config, threads: int) -> int:
    """Threads of a rule that would ask for `threads`: 1 for a CPU-scale config (module docstring)."""
    return 1 if cpu_scale(cfg) else threads


def window_step_seconds(cfg: Config) -> float:
    """Seconds of one DDIM step of one window of the volume model at this config's sizes."""
    scaled = WINDOW_STEP_S * conv_work(cfg, "volume_window") / conv_work(_paper(), "volume_window")
    return max(scaled, DEMO_STEP_S["volume_stage2"] / 3)  # a forward pass: about a third of a training step


def volume_seconds(cfg: Config, depth: int) -> float:
    """Sampling one volume of `depth` slices: DDIM steps x windows x window step (+ decoding, ~ 1 window)."""
    window, overlap = cfg.volume_model.window, cfg.sampling.overlap
    windows = max(1, math.ceil((depth - overlap) / max(1, window - overlap)))
    return (cfg.sampling.steps + 1) * windows * window_step_seconds(cfg)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def data_size(cfg: Config, results: Path | None = None) -> DataSize:
    """Cases and slices per case: from results/<name>/split.json and latents/index.json when they exist."""
    n = cfg.data.max_cases or (cfg.phantoms.n_cases if cfg.phantoms is not None else DEFAULT_CASES)
    n_test = max(1, round(n * cfg.data.test_fraction))
    depth = int(cfg.phantoms.shape[2]) if cfg.phantoms is not None else DEFAULT_DEPTH
    if results is not None:
        split = _read_json(Path(results) / "split.json")
        if isinstance(split, dict) and isinstance(split.get("train"), list):
            n, n_test = len(split["train"]) + len(split.get("test", [])), len(split.get("test", []))
        index = _read_json(Path(results) / "latents" / "index.json")
        shapes = [c.get("shape") for c in (index or {}).get("cases", {}).values() if isinstance(c, dict)]
        depths = [s[1] for s in shapes if isinstance(s, list) and len(s) == 4]
        if depths:
            depth = max(depths)
    return DataSize(n_train=max(1, n - n_test), n_test=max(1, n_test), depth=max(1, depth))


def _latent_mb(cfg: Config, cases: int, depth: int) -> float:
    """Image and mask latents of `cases` cases in memory (float16), as the diffusion trainings hold them."""
    from gem3d.models import specs

    return cases * depth * specs.latent_channels(cfg) * _latent_side(cfg) ** 2 * 2 * 2 / 1e6


def _work(cfg: Config, rule: str, data: DataSize, wildcards: dict, results: Path | None = None) -> tuple[float, float]:
    """(seconds of work, MB held beyond the base) of one job of `rule` (`results`: the run's folder, if known)."""
    n_cases = data.n_train + data.n_test
    pixels = (cfg.preprocess.slice_size / 512) ** 2  # relative to the paper's 512x512 slices
    if rule == "train_vae" and cfg.vae.pretrained:  # an imported VAE: no training, the scale factor only
        rule = "encode_latents"
    if rule in NETWORK:
        network = NETWORK[rule]
        section = {"vae": cfg.vae.train, "slice_model": cfg.slice_model.train,
                   "volume_stage1": cfg.volume_model.stage1, "volume_stage2": cfg.volume_model.stage2}[network]
        held = 4000 * pixels if network == "vae" else 1.5 * _latent_mb(cfg, data.n_train, data.depth)
        return section["steps"] * step_seconds(cfg, network), held
    if rule == "import_network":  # a release checkpoint holds the weights, their average and AdamW's moments
        return 120.0, IMPORT_MB
    own = _own_training(rule)
    if own is not None:  # a generation method's own training: its budget's items x its estimated item time
        method, training = own
        items = registry.budget(cfg, method.name).samples
        held = 1.5 * _latent_mb(cfg, data.n_train, data.depth) if training.reads == "latents" else 2000 * pixels
        module = registry.implementation(method)
        if hasattr(module, "host_memory_mb"):  # a method that holds its own training data (3D Pix2Pix's volumes)
            held = max(held, module.host_memory_mb(cfg, data.n_train))
        return items * training.item_seconds, held
    if rule == "encode_latents":
        ratio = conv_work(cfg, "vae") / conv_work(_paper(), "vae")
        return n_cases * data.depth * ENCODE_SLICE_S * ratio, 4000 * pixels
    if rule in ("sample_shard", "figure_fig3_counterfactual"):
        shards = int(wildcards.get("shards", 1))
        # Fig. 3: 2 masks (original, edited) x 4 informed slices (gem3d/report/counterfactual.py)
        volumes = 8 if rule == "figure_fig3_counterfactual" else math.ceil(data.n_train / max(1, shards))
        return volumes * volume_seconds(cfg, data.depth), 4000 * pixels
    if rule == "generate":  # gem3d generate: the masks of generation.masks, in shards, copies each
        g = cfg.generation
        masks = Path(g.masks) if g.masks else None
        n_masks = len(list(masks.glob("*.nii*"))) if masks is not None and masks.is_dir() else 1
        shards = int(wildcards.get("shards", g.shards))
        volumes = math.ceil(n_masks / max(1, shards)) * g.copies
        return volumes * volume_seconds(cfg, data.depth), 4000 * pixels
    if rule == "prepare_segmentation":  # nnU-Net preprocessing of a row's cases (the real row also plans)
        from gem3d.sampling import sets

        spec = sets.downstream_rows(cfg).get(wildcards.get("data", ""))
        n_cases = data.n_train * ((len(spec.sets) + spec.real) if spec is not None else 1)
        procs = max(1, cfg.evaluation.segmentation.num_processes)
        return n_cases * NNUNET_PREPROCESS_CASE_S / procs, NNUNET_WORKER_MEM_MB * procs
    if rule == "train_segmentation":
        seg = cfg.evaluation.segmentation
        iterations = seg.epochs * (seg.iterations_per_epoch + seg.val_iterations)
        seconds = iterations * NNUNET_ITERATION_S + data.n_test * PREDICT_CASE_S
        return seconds, NNUNET_WORKER_MEM_MB * (seg.num_processes + 2)
    if rule == "evaluate_adherence":  # the real-data nnU-Net predicts every generated volume of the rows' sets
        from gem3d.sampling import sets

        return len(sets.adherence_sets(cfg)) * data.n_train * PREDICT_CASE_S, NNUNET_WORKER_MEM_MB * 2
    if rule == "preprocess_nnunet":
        procs = max(1, cfg.preprocess.num_processes)
        return n_cases * NNUNET_PREPROCESS_CASE_S / procs, NNUNET_WORKER_MEM_MB * procs
    if rule in ("import_data", "build_slices"):
        return n_cases * IMPORT_CASE_S, 2000 * pixels
    if rule in ("evaluate_generation", "evaluate_fidelity", "evaluate_privacy"):
        from gem3d.sampling import sets

        volumes = {"evaluate_generation": len(sets.generation_sets(cfg)) * data.n_train,
                   "evaluate_fidelity": len(sets.test_sets(cfg)) * data.n_test,
                   "evaluate_privacy": len(sets.privacy_sets(cfg)) * data.n_train}[rule]
        return volumes * (PRIVACY_VOLUME_S if rule == "evaluate_privacy" else EVAL_VOLUME_S), 8000 * pixels
    if rule == "figure_training_curves":  # reads every network's model file whole (weights, average, AdamW moments)
        files = list((Path(results) / "models").glob("*.pt")) if results is not None else []
        return 0.0, max((f.stat().st_size / 1e6 for f in files), default=IMPORT_MB)
    return 0.0, 0.0  # phantoms, merging, tables, figures from finished sets: minutes at most


def _own_training(rule: str):
    """(method, training) of a generation method's own training rule (train_pix2pix, ...; not the volume stages)."""
    found = [(m, t) for m, t in registry.trainings(rule) if not t.stage]
    return found[0] if found else None


def job_size(cfg: Config, rule: str, results: Path | None = None, wildcards: dict | None = None,
             attempt: int = 1) -> JobSize:
    """Memory, wall time and GPUs of one job of `rule`.

    `results`: the run's folder (results/<name>), read for the data size; `wildcards`: the job's wildcards
    (sample_shard: `shards`; the train_segmentation_<data> rules are rule "train_segmentation" with `data`).
    """
    data = data_size(cfg, results)
    seconds, held_mb = _work(cfg, rule, data, dict(wildcards or {}), results)
    own = _own_training(rule)
    gpu = int(rule in GPU_RULES or (own is not None and own[1].gpu))  # a method_modules training too
    runtime = max(MIN_RUNTIME_MIN, math.ceil(OVERHEAD_MIN + SAFETY * seconds / 60))
    mem_mb = math.ceil((BASE_MEM_MB + gpu * GPU_HOST_MEM_MB + SAFETY * held_mb) / 100) * 100
    resumable = rule in RESUMABLE or own is not None
    return JobSize(mem_mb=mem_mb * attempt, runtime=runtime * (1 if resumable else attempt), gpu=gpu)


def local_gpu_limit(environ: dict | None = None) -> int:
    """How many GPU jobs may run at once on this machine when Snakemake runs them locally.

    1 when a GPU is visible (CUDA_VISIBLE_DEVICES lists one, or /dev/nvidia<N> exists): every local
    job computes on the first GPU, so two at once would share one card. 0 without one (and under
    GEM3D_DEVICE=cpu): the `gpu` resource then limits nothing and the GPU stages run on the CPU side
    by side, bounded by --cores.
    """
    env = os.environ if environ is None else environ
    if env.get("GEM3D_DEVICE", "auto") == "cpu":
        return 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return int(any(d.strip() not in ("", "-1") for d in visible.split(",")))
    return int(any(p.name[len("nvidia"):].isdigit() for p in Path("/dev").glob("nvidia*")))
