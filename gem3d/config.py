"""Configuration: one YAML file per dataset, validated once, then frozen dataclasses.

`load_config(path)` reads the file (duplicate keys are an error; `1e-4` is a number as in YAML 1.2),
checks it against `gem3d/config.schema.yaml` (JSON schema draft 2020-12; unknown keys and wrong
types fail with the key's dotted path), builds the dataclasses below (the defaults are the paper's
settings) and refuses, naming the key, every value that could only fail in a later stage: non-finite
numbers, sizes the networks cannot divide, an overlap as wide as the window, a noise schedule or a
DDIM step count that cannot be built, and (with `check_paths`) configured weights files that do not
exist. The input data folder is checked by the `import` command alone (`check_data_path`), so a
workflow can be planned before the data are there. Every refusal is one `InputError` line.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from gem3d.config_file import read_config_file
from gem3d.io import InputError
from gem3d.methods import registry
from gem3d.training.batching import batch_plan
from gem3d.training.train_config import TrainConfig

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
DATA_FORMATS = ("brats", "msd_brats", "msd", "abdomenct1k", "folder")
MERGED_SECTIONS = ("model", "train", "stage1", "stage2")  # dict fields whose keys override the defaults one by one


@dataclass(frozen=True)
class DataConfig:
    format: str  # one of DATA_FORMATS
    path: str  # input folder (relative paths are relative to the working directory)
    labels: dict[str, int]  # label names -> ids AFTER import (0 = background)
    modality: str = "MRI"  # nnU-Net channel name; "CT" selects nnU-Net's CT normalisation
    test_fraction: float = 0.2  # seeded train/test split
    on_bad_case: str = "stop"  # "stop": first bad case stops the import; "skip": skip and report
    max_cases: int | None = None  # import only the first N cases (sorted by id); None = all
    image_glob: str = "images/*.nii.gz"  # folder format only: images, relative to path
    mask_dir: str = "masks"  # folder format only: masks with the same file names
    affine_tolerance: float = 1e-3  # max abs difference between image and mask affines
    channel: str | int | None = None  # 4-D images: the channel to import, by name (the folder's dataset.json) or index
    split: str | dict | None = None  # user test set: a JSON/text file, or {train: [...], test: [...]}; None: seeded
    test_path: str | None = None  # a second folder (same format) whose cases are the test set


@dataclass(frozen=True)
class PhantomConfig:
    n_cases: int = 12  # synthetic head volumes written before import (demo data)
    shape: tuple[int, int, int] = (48, 48, 40)  # voxels (x, y, z)
    n_scanners: int = 3  # simulated scanners with different intensity responses
    seed: int = 0


@dataclass(frozen=True)
class PreprocessConfig:
    dataset_id: int = 901  # nnU-Net dataset id (Dataset<id>_<name>)
    configuration: str = "3d_fullres"
    num_processes: int = 2  # nnU-Net fingerprint/preprocessing worker processes
    slice_size: int = 512  # every axial slice is made square (slice_fit) and resized to slice_size x slice_size
    slice_fit: str = "letterbox"  # "letterbox" (no distortion) | "stretch" (the authors' data loader)
    intensity: str = "region"  # min-max over the non-zero region, -1 outside | "volume": the whole volume (authors)


@dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # "scaled linear": linspace(sqrt(start), sqrt(end)) ** 2
    beta_end: float = 0.012


@dataclass(frozen=True)
class VAEAdversarialSettings:
    # patch discriminator with hinge loss, weighted adaptively (gem3d/models/discriminator.py); off by default
    weight: float = 0.0  # 0: off (the default); latent diffusion's KL-f8: 0.5, times the adaptive gradient ratio
    start: int = 25000  # optimizer step from which the discriminator trains and the generator term counts
    layers: int = 3  # stride-2 convolutions of the discriminator (latent diffusion: 3; slices >= 3 * 2**layers)
    base_channels: int = 64  # width of its first convolution (latent diffusion: 64)
    max_adaptive_weight: float = 1e4  # clamp of the gradient-norm ratio in latent diffusion's (pixel-summed) units


@dataclass(frozen=True)
class VAESettings:
    # VAEConfig fields (gem3d/models/vae.py); in_channels is always 1 (grey slices and masks)
    model: dict = field(default_factory=lambda: dict(base_channels=128, channel_mult=[1, 2, 4, 4],
                                                     num_res_blocks=2, latent_channels=4))
    # TrainConfig fields (gem3d/training/loop.py)
    train: dict = field(default_factory=lambda: dict(steps=50000, lr=1e-4, batch_size=8, ema_decay=0.0,
                                                       precision="bf16", log_every=100, checkpoint_every=2000))
    # Training terms: L1 + KL always; LPIPS and adversarial only when their weight is > 0 (default: both off)
    kl_weight: float = 1e-6  # KL weight against the pixel-summed L1 (latent diffusion's autoencoder value)
    perceptual_weight: float = 0.0  # VGG-LPIPS term (latent diffusion: 1.0); 0: off
    perceptual_vgg_weights: str | None = None  # torchvision VGG-16 weights of that term (never Table 2's LPIPS)
    adversarial: VAEAdversarialSettings = field(default_factory=VAEAdversarialSettings)
    pretrained: str | None = None  # an existing KL-f8 autoencoder file (latent diffusion or diffusers) or a release run
    scale_factor: float | None = None  # None: measured on the training latents (or a release run's yaml value)
    mask_fraction: float = 0.5  # fraction of each batch that are masks-as-images (the VAE encodes both)
    scale_slices: int = 2048  # training slices encoded to measure the latent scale factor
    eval_slices: int = 256  # test slices for the reconstruction PSNR/SSIM in the log


@dataclass(frozen=True)
class SliceModelSettings:
    # UNetConfig fields; in/out channels and context_dim are derived (latent channels, position_dim)
    model: dict = field(default_factory=lambda: dict(model_channels=224, channel_mult=[1, 2, 4, 4],
                                                     num_res_blocks=2, attention_levels=[0, 1, 2], head_dim=32))
    train: dict = field(default_factory=lambda: dict(steps=150000, lr=1.6e-5, batch_size=32,
                                                       precision="bf16", ema_decay=0.9999))
    position_dim: int = 128  # sinusoidal embedding of the normalised slice position p in [0, 1]
    pretrained: str | None = None  # a release run folder / checkpoint or a gem3d model file instead of a training
    pretrained_weights: str = "live"  # release checkpoints: "live" (what the authors sampled with) or "ema"


@dataclass(frozen=True)
class VolumeSettings:
    window: int = 16  # slices per training window (n)
    # UNetConfig fields; in/out channels and slice_axis are derived
    model: dict = field(default_factory=lambda: dict(model_channels=224, channel_mult=[1, 2, 3, 4],
                                                     num_res_blocks=2, attention_levels=[1, 2, 3], head_dim=32,
                                                     ff_mult=0))
    stage1: dict = field(default_factory=lambda: dict(steps=150000, lr=4e-5, batch_size=8, precision="bf16",
                                                        grad_checkpointing=True, ema_decay=0.9999))
    stage2: dict = field(default_factory=lambda: dict(steps=50000, lr=4e-5, batch_size=8, precision="bf16",
                                                        grad_checkpointing=True, ema_decay=0.9999))
    stage2_timesteps: str = "linear_decay"  # one t per window, weight ~ 2T - t (authors); or "uniform"
    baseline: bool = True  # also train the Make-A-Volume baseline (mask latent only) with the same settings
    # networks from files instead of trainings, per stage ({stage1: PATH, stage2: PATH}; see slice_model.pretrained)
    pretrained: dict | None = None
    baseline_pretrained: dict | None = None
    pretrained_weights: str = "live"
    # the cross-attention variant (comparisons: crossattn) with a frozen image encoder instead of its trained
    # tokenizer: {extractor: radimagenet_resnet50 | inception_v3, weights: FILE}, the pooled embedding of the
    # informed slice as its context (the paper: a CLIP image embedding); None: the trained tokenizer
    crossattn_encoder: dict | None = None


@dataclass(frozen=True)
class Pix2PixSettings:
    # 3D Pix2Pix (Tables 1-2): whole volumes resampled to volume_size (slices, rows, cols) for training and sampling
    volume_size: tuple[int, int, int] = (64, 128, 128)
    # Pix2Pix3DConfig fields (gem3d/models/pix2pix3d.py); in/out channels are derived from the labels
    model: dict = field(default_factory=lambda: dict(base_channels=32, levels=4, disc_base_channels=64,
                                                     disc_layers=3, dropout=0.5))  # pix2pix's dropout
    # Adam, and pix2pix's schedule: constant, then linear decay toward 0 over the last half of the steps
    train: dict = field(default_factory=lambda: dict(steps=50000, lr=2e-4, betas=[0.5, 0.999], weight_decay=0.0,
                                                       batch_size=1, precision="bf16", ema_decay=0.0, lr_decay=0.5))
    l1_weight: float = 100.0  # pix2pix's lambda: L1 weight beside the adversarial term (weight 1)


@dataclass(frozen=True)
class LDM3DSettings:
    # conditional 3D LDM (Tables 1-2): per-slice VAE latents stacked to `depth` slices (padded; deeper: resampled)
    depth: int = 32
    # UNet3DConfig fields (gem3d/models/unet3d.py); in/out channels are derived (2 x / 1 x latent channels)
    model: dict = field(default_factory=lambda: dict(model_channels=64, channel_mult=[1, 2, 4], num_res_blocks=2,
                                                     attention_levels=[2], head_dim=32))
    train: dict = field(default_factory=lambda: dict(steps=150000, lr=4e-5, batch_size=8, precision="bf16",
                                                       grad_checkpointing=True, ema_decay=0.9999))


@dataclass(frozen=True)
class AugmentationConfig:
    mode: str = "brain"  # "brain": flip + rotation + tumour moved toward the centre; "abdomen": rotation only
    flip_axes: tuple[int, ...] = (2,)  # brain: only the left-right axis 2 of the (z, y, x) arrays may flip; () none
    max_rotation_deg: float = 2.5  # per axis
    translate_range: tuple[float, float] = (20.0, 60.0)  # voxels, toward the volume centre
    tumour_labels: tuple[int, ...] = (1, 2, 3)  # labels moved together as one object


@dataclass(frozen=True)
class InformedFitConfig:
    # IC informed-slice fit guard (gem3d/sampling/informed.py): off while min_dice is None
    min_dice: float | None = None  # Dice of the candidate's outline with the mask's slice; None: off (paper)
    max_tumour_outside: float = 0.1  # share of the mask slice's labelled voxels outside the candidate's outline
    max_tries: int = 20  # candidates looked at before the best one is taken


@dataclass(frozen=True)
class SamplingConfig:
    solver: str = "ddim"  # "ddim" (paper) | "dpmpp_2m" (DPM-Solver++(2M): eta 0 the ODE, eta 1 the SDE)
    steps: int = 200  # network calls per window (paper: 200 DDIM steps)
    eta: float = 1.0  # noise per step, 0 to 1: DDIM eta (authors' runs: 1.0); dpmpp_2m: 0 (ODE) to 1 (SDE)
    ddim_spacing: str = "leading"  # DDIM's timestep grid: "leading" | "ldm" (latent diffusion's, the authors')
    fit: InformedFitConfig = field(default_factory=InformedFitConfig)
    overlap: int = 1  # slices shared by consecutive windows (h)
    volumes_per_batch: int = 4  # volumes propagated together (their windows share one network batch)
    max_batch_windows: int = 64  # windows per network call (memory bound)
    precision: str = "bf16"  # bf16 autocast on any device (CPU included)
    shards: int = 1  # split every sample set into this many jobs (one GPU each on a cluster)
    # Table 1 generation sets over the training masks: name -> {informed: IC|IG, augment: bool}
    sets: dict = field(default_factory=lambda: {"IC": {"informed": "IC", "augment": False},
                                                "IC_MA": {"informed": "IC", "augment": True},
                                                "IG": {"informed": "IG", "augment": False},
                                                "IG_MA": {"informed": "IG", "augment": True}})
    enhancement_set: str = "IC"  # its copies form the 1x/2x/3x datasets: true masks (paper); an *_MA set = moved masks
    enhancement_multiples: tuple[int, ...] = (1, 2, 3)
    deenhance_informed: str = ""  # "CASE:SLICE" fixed informed slice (empty: first training case, middle slice)
    seed: int = 0


@dataclass(frozen=True)
class SegmentationEvalConfig:
    epochs: int = 1000  # nnU-Net epochs (nnU-Net's default: 1000)
    iterations_per_epoch: int = 250  # nnU-Net default
    val_iterations: int = 50  # nnU-Net default
    configuration: str = "3d_fullres"  # a configuration nnU-Net plans for the dataset: 2d, 3d_fullres, 3d_lowres
    num_processes: int = 2  # nnU-Net preprocessing / data augmentation workers
    augmentation_processes: int | None = None  # data augmentation workers of a training (0: in the training
    # process); None: num_processes
    batch_size: int | None = None  # the downstream networks' batch (the real row's plans, so every row's); None: nnU-Net's
    base_features: int | None = None  # the networks' first-stage features, every stage scaled alike (the real row's
    # plans); None: nnU-Net's (32)
    seeds: int = 1  # every row is trained once per seed (0..seeds-1); intervals pool the seeds per test case
    real_plus: tuple[int, ...] = ()  # rows of the real cases + k generated copies, k of sampling.enhancement_multiples
    min_adherence: float | None = None  # set: a row of the largest multiple without volumes of lower mask adherence
    test_time_mirroring: bool = True  # nnU-Net's default; false: its --disable_tta (a quarter of a 2d prediction)


@dataclass(frozen=True)
class EvaluationConfig:
    fid_extractor: str = "radimagenet_resnet50"  # | inception_v3 | random_conv (weights-free, not comparable)
    fid_weights: str | None = None  # local weights file for the extractor
    fid_batch_size: int = 32
    lpips_net: str = "alex"  # alex | vgg
    lpips_backbone_weights: str | None = None  # torchvision alexnet/vgg16 weights; None: LPIPS not computed
    lpips_lin_weights: str | None = None  # LPIPS linear heads; None: torchmetrics' bundled file
    privacy_quantile: float = 0.95  # flag generated volumes closer to a training volume than this quantile
    segmentation: SegmentationEvalConfig = field(default_factory=SegmentationEvalConfig)


@dataclass(frozen=True)
class GenerationConfig:
    # `gem3d generate`: images for masks of your own (each key is the default of the command's option)
    masks: str | None = None  # a mask NIfTI, or a folder of them (the Snakemake `generate` rule runs when set)
    informed: str = "IG"  # "IG" (slice model) or "CASE:SLICE" of the dataset; ignored with informed_image
    informed_image: str | None = None  # a 2D or 3D NIfTI of your own as the informed slice
    slice: int | None = None  # informed_image's slice along its third axis (None: its middle one)
    region: str | None = None  # body region on the mask's grid: a NIfTI, or a folder with the masks' file names
    copies: int = 1  # volumes per mask (different seeds)
    shards: int = 1  # split the masks into this many jobs
    seed: int = 0


@dataclass(frozen=True)
class Config:
    name: str  # results go to results/<name>/
    data: DataConfig
    seed: int = 0
    phantoms: PhantomConfig | None = None  # set -> synthetic data are generated into data.path
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    vae: VAESettings = field(default_factory=VAESettings)
    slice_model: SliceModelSettings = field(default_factory=SliceModelSettings)
    volume_model: VolumeSettings = field(default_factory=VolumeSettings)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # the paper's other methods, each trained and sampled beside GEM-3D: pix2pix, ldm3d (Tables 1-2) and the
    # injection variants controlnet, crossattn of the volume model (Table 3), and methods of method_modules; () = none
    comparisons: tuple[str, ...] = ()
    method_modules: tuple[str, ...] = ()  # modules of added generation methods (gem3d/methods/registry.py)
    pix2pix: Pix2PixSettings = field(default_factory=Pix2PixSettings)
    ldm3d: LDM3DSettings = field(default_factory=LDM3DSettings)
    source: str = ""  # the file this config was read from
    results_root: str = "results"  # where results/<name> lives (not a config key: a bundle sets it to its folder)

    @property
    def results_dir(self) -> Path:
        return Path(self.results_root) / self.name

    @property
    def max_label(self) -> int:
        return max(self.data.labels.values())

    @property
    def nnunet_dataset_name(self) -> str:
        return f"Dataset{self.preprocess.dataset_id:03d}_{self.name}"

    def pretrained(self, model: str) -> str | None:
        """The file a model comes from instead of a training (None: trained); `model` is a model file name:
        vae, slice_model, volume_stage1/2, baseline_stage1/2. A stage 1 not given comes from its given stage 2
        (stage 2 trains only the slice-axis layers, so its 2D weights are stage 1's)."""
        if model == "vae":
            return self.vae.pretrained
        if model == "slice_model":
            return self.slice_model.pretrained
        variant, _, stage = model.rpartition("_stage")
        pair = {"volume": self.volume_model.pretrained, "baseline": self.volume_model.baseline_pretrained}.get(variant)
        pair = pair or {}
        if stage == "1" and not pair.get("stage1"):  # stage 2 trains only its slice-axis layers: its 2D part is stage 1
            return pair.get("stage2")
        return pair.get(f"stage{stage}")


@lru_cache(maxsize=1)
def _schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate_dict(raw: Any, source: str) -> None:
    """Validate a raw config against the JSON schema; raise InputError with the key path."""
    import jsonschema

    if not isinstance(raw, dict):
        raise InputError(f"{source}: a config is a mapping of keys (name: ..., data: ...), "
                         f"not a {type(raw).__name__}")
    _refuse_non_finite(raw, source, "")
    modules = raw.get("method_modules") or []
    if isinstance(modules, list) and all(isinstance(m, str) for m in modules):
        registry.load_modules(modules, source)  # before the schema: their names are valid `comparisons` entries
    schema = copy.deepcopy(_schema())
    schema["properties"]["comparisons"]["items"]["enum"] = registry.comparison_names()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        if err.validator == "additionalProperties":
            where = where if where != "<top level>" else "top level"
            raise InputError(f"{source}: unknown key at {where}: {err.message}")
        raise InputError(f"{source}: config key {where}: {err.message}")


def _refuse_non_finite(value: Any, source: str, where: str) -> None:
    """inf and NaN pass the schema's `number` type; no config value may be either."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{source}: config key {where}: {value} is not a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _refuse_non_finite(item, source, f"{where}.{key}" if where else str(key))


def load_config(path: str | Path, check_paths: bool = True) -> Config:
    """Read, validate and freeze a config file (check_paths: configured weights files must exist)."""
    path = Path(path)
    return config_from_dict(read_config_file(path), source=str(path), check_paths=check_paths)


def config_from_dict(raw: Any, source: str = "<config>", check_paths: bool = True) -> Config:
    validate_dict(raw, source)
    cfg = _build(Config, {**raw, "source": source})
    _check_model_sections(cfg, source)
    _check_values(cfg, source)
    if check_paths:
        _check_weights_files(cfg, source)
    return cfg


def _relative_to(path: Path) -> str:
    return "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"


def check_data_path(cfg: Config) -> None:
    """The `import` command's check: data.path is a folder (unless the phantoms stage writes it)."""
    if cfg.phantoms is not None:
        return
    path = Path(cfg.data.path)
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise InputError(f"{cfg.source}: data.path {path}{_relative_to(path)} {problem}")


def _check_weights_files(cfg: Config, source: str) -> None:
    """Configured weights files exist (a missing one would fail, or be skipped, after the trainings)."""
    ev = cfg.evaluation
    for key in ("fid_weights", "lpips_backbone_weights", "lpips_lin_weights"):
        value = getattr(ev, key)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{source}: config key evaluation.{key}: weights missing at {value}"
                             f"{_relative_to(Path(value))}")
    if cfg.vae.perceptual_vgg_weights is not None and not Path(cfg.vae.perceptual_vgg_weights).is_file():
        raise InputError(f"{source}: config key vae.perceptual_vgg_weights: weights missing at "
                         f"{cfg.vae.perceptual_vgg_weights}{_relative_to(Path(cfg.vae.perceptual_vgg_weights))}")
    pretrained = {"vae.pretrained": cfg.vae.pretrained, "slice_model.pretrained": cfg.slice_model.pretrained}
    for variant, key in (("volume", "pretrained"), ("baseline", "baseline_pretrained")):
        for stage in (1, 2):
            pretrained[f"volume_model.{key}.stage{stage}"] = cfg.pretrained(f"{variant}_stage{stage}")
    for key, value in pretrained.items():
        if value is not None and not Path(value).exists():
            raise InputError(f"{source}: config key {key}: file missing at {value}{_relative_to(Path(value))}")
    encoder = cfg.volume_model.crossattn_encoder
    if encoder is not None and "crossattn" in cfg.comparisons and not Path(encoder["weights"]).is_file():
        raise InputError(f"{source}: config key volume_model.crossattn_encoder.weights: weights missing at "
                         f"{encoder['weights']}{_relative_to(Path(encoder['weights']))}")
    if ev.lpips_backbone_weights is not None and ev.lpips_lin_weights is None:
        from gem3d.evaluation.paired import default_lpips_lin_path

        bundled = default_lpips_lin_path(ev.lpips_net)
        if not bundled.is_file():
            raise InputError(f"{source}: config key evaluation.lpips_lin_weights: unset, and torchmetrics' "
                             f"bundled LPIPS heads are missing at {bundled}; give the file")


def _check_values(cfg: Config, source: str) -> None:
    """Values the schema cannot relate to each other; each would otherwise fail in a later stage."""
    from gem3d.diffusion import NoiseSchedule, build_solver

    def refuse(key: str, problem: str) -> None:
        raise InputError(f"{source}: config key {key}: {problem}")

    s, d = cfg.sampling, cfg.diffusion
    if s.overlap >= cfg.volume_model.window:
        refuse("sampling.overlap", f"{s.overlap} must be smaller than volume_model.window "
                                   f"({cfg.volume_model.window}), the slices of one window")
    try:
        schedule = NoiseSchedule(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start,
                                 beta_end=d.beta_end)
    except ValueError as exc:
        refuse("diffusion", str(exc))
    try:
        build_solver(s.solver, schedule, s.steps, s.eta, s.ddim_spacing)
    except ValueError as exc:
        refuse("sampling.steps", f"{exc} (diffusion.num_train_timesteps)")
    size = cfg.preprocess.slice_size
    seg = cfg.evaluation.segmentation
    extra = sorted(set(seg.real_plus) - set(s.enhancement_multiples))
    if extra:
        refuse("evaluation.segmentation.real_plus", f"{extra} not in sampling.enhancement_multiples "
                                                    f"{list(s.enhancement_multiples)}")
    if s.enhancement_set not in s.sets:
        refuse("sampling.enhancement_set", f"{s.enhancement_set!r} is not one of sampling.sets {sorted(s.sets)}")
    own = {"deenhanced"} | {name for m in registry.enabled(cfg) for name in (m.train_set, *(t.name for t in m.test_sets))}
    for name in s.sets:  # another definition of a set the pipeline makes would silently replace one of the two
        if name in own or re.fullmatch(rf"{re.escape(s.enhancement_set)}_copy\d+", name):
            refuse(f"sampling.sets.{name}", "a name the pipeline gives a set of its own (the methods' sets, "
                                            "deenhanced, the enhancement copies <set>_copyK); choose another")
    if cfg.data.split is not None and cfg.data.test_path is not None:
        raise InputError(f"{source}: config keys data.split and data.test_path are both set; set one (the test cases "
                         "are named by the split or are the test_path folder's)")
    ids = sorted(cfg.data.labels.values())
    if ids != list(range(len(ids))):
        refuse("data.labels", f"must use the ids 0..K once each (nnU-Net's rule), got {ids}")
    aug = cfg.augmentation
    if aug.translate_range[0] > aug.translate_range[1]:
        refuse("augmentation.translate_range", f"{list(aug.translate_range)}: the low end is above the high end")
    if cfg.evaluation.fid_extractor == "random_conv" and cfg.evaluation.fid_weights is not None:
        refuse("evaluation.fid_weights", "must be null for fid_extractor random_conv (it has no weights)")
    vae = cfg.vae
    if vae.pretrained is None and vae.adversarial.weight > 0:
        steps = TrainConfig.from_dict(vae.train).steps
        if vae.adversarial.start >= steps:
            refuse("vae.adversarial.start", f"{vae.adversarial.start} is not below vae.train.steps {steps}, so the "
                                            "adversarial term would never switch on")
        if size < 3 * 2 ** vae.adversarial.layers:
            refuse("vae.adversarial.layers", f"{vae.adversarial.layers} layers need slices of at least "
                                             f"{3 * 2 ** vae.adversarial.layers} pixels (preprocess.slice_size {size})")
    if vae.pretrained is None and vae.perceptual_weight > 0:
        if vae.perceptual_vgg_weights is None:
            refuse("vae.perceptual_weight", f"{vae.perceptual_weight} needs VGG-16 weights for its VGG-LPIPS: set "
                                            "vae.perceptual_vgg_weights")
        if cfg.evaluation.lpips_net == "vgg" and cfg.evaluation.lpips_backbone_weights is not None:
            refuse("vae.perceptual_weight", f"{vae.perceptual_weight} trains with VGG-LPIPS, the LPIPS that "
                                            "evaluation.lpips_net vgg reports in Table 2: evaluate with alex")


def _check_model_sections(cfg: Config, source: str) -> None:
    """Every training section, then every enabled generation method's check (its networks and sizes, through the
    registry; GEM-3D's covers the VAE and the slice model), so a bad value fails before any job runs."""
    for where, section in (("vae.train", cfg.vae.train), ("slice_model.train", cfg.slice_model.train),
                           ("volume_model.stage1", cfg.volume_model.stage1),
                           ("volume_model.stage2", cfg.volume_model.stage2)):
        try:
            batch_plan(TrainConfig.from_dict({"seed": cfg.seed, **section}), 1)
        except (ValueError, TypeError, InputError) as exc:
            raise InputError(f"{source}: config key {where}: {exc}") from None
    registry.check(cfg)


def _build(cls: type, raw: dict) -> Any:
    """Build a (nested) frozen dataclass from a validated dict."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            value = _coerce(hints[f.name], raw[f.name])
            if f.name in MERGED_SECTIONS:
                value = {**f.default_factory(), **value}  # a partial section overrides the defaults key by key
            kwargs[f.name] = value
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value)
    if tp is dict or typing.get_origin(tp) is dict:
        return dict(value)
    if origin is tuple:
        return tuple(value)
    if tp is float:
        return float(value)
    return value


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config (for manifests and checkpoints)."""
    return dataclasses.asdict(cfg)
