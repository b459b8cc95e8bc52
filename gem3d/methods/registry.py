"""The registry of generation methods: one `Method` entry each, the way diffusers lists its schedulers.

Every part of the pipeline that depends on which methods a run has asks here: the config check
(gem3d/config.py), the sample sets (gem3d/sampling/sets.py), the Snakemake rules (workflow/rules/models.smk,
sampling.smk), the training fingerprints (gem3d/fingerprint.py), the job sizes (gem3d/resources.py), the
tables' notes (gem3d/evaluation/stages.py) and the report's Fig. 2 (gem3d/report/figures.py). This module is
torch-free and imports nothing of gem3d but `gem3d.io`: the entries are data.

A method's code lives in one module (`Method.module`), which the registry imports by its dotted name when the
method is used (`implementation`), as nnU-Net finds a trainer class by name. The module provides:

    check(cfg, name) -> None            refuse, with one InputError line naming the key, a config it cannot run
    train(cfg, name, model) -> None     train (or resume) one of its model files (`Method.trainings`)
    sampler(cfg, name, spec)            an object with generate(jobs, pin) -> list of (d, s, s) images in [-1, 1],
                                        `solver` (None or a diffusion solver) and `checkpoints` ({model: sha256})
    budget(cfg, name) -> Budget         what the method is given (the tables' notes; scripts/budgets.py)

`name` is the method's registry name (one module may implement several: gem3d/methods/volume.py does the four
volume-model variants). A method added outside gem3d is a module that defines `METHOD = Method(...)` (its
registry line) and the four functions; a config lists it in `method_modules` (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import reduce
from types import ModuleType
from typing import Any

from gem3d.io import InputError

SOLVER_KEYS = ("sampling.solver", "sampling.steps", "sampling.eta", "sampling.ddim_spacing", "sampling.precision",
               "diffusion")
WINDOW_KEYS = ("sampling.overlap", "volume_model.window")  # the window propagation's
INTERFACE = ("check", "train", "sampler", "budget")


@dataclass(frozen=True)
class Training:
    """One model file a method trains."""

    model: str  # its file name under models/ (Paths.model): "pix2pix", "controlnet_stage1"
    rule: str  # the Snakemake rule that trains it, also its key in gem3d.resources and gem3d.fingerprint
    keys: tuple[str, ...] = ()  # the config keys that define it (its rerun and resume fingerprint); a volume stage's
    # rule is shared by the variants: its keys are gem3d.fingerprint.STAGE_KEYS', these the variant's own beside them
    reads: str = "latents"  # its data: "latents" (the latent cache) or "slices" (the slice store)
    after: tuple[str, ...] = ()  # model files it reads (the VAE, the stage 1 a stage 2 starts from)
    stage: int = 0  # 1 or 2: a volume-model stage (rules train_volume_stage1/2); 0: a rule of its own
    command: str = ""  # the `gem3d` stage that trains it ("": train-method --method NAME --model MODEL)
    item_seconds: float = 0.0  # job sizes: estimated seconds per training item on one GPU (not measured)
    gpu: bool = True  # its job wants a GPU


@dataclass(frozen=True)
class TestSet:
    """A Table 2 set: the test masks, each with its true informed slice when the method takes one."""

    name: str
    stage: int = 0  # the volume-model stage sampled (0: a method without stages)
    pin: bool = True  # overlapped inpainting (window methods)


@dataclass(frozen=True)
class Method:
    name: str  # registry name: sample sets' "variant", `comparisons` entries, the train-method --method value
    label: str  # in tables' notes and figures
    module: str  # dotted name of the implementation module (check, train, sampler, budget)
    switch: str = "comparisons"  # "always", "comparisons" (on while listed there) or a boolean config key
    section: str = ""  # the config section of its own settings ("": it has none)
    informed: bool = False  # takes an informed slice (the paper's D.C. column: can decouple the conditions)
    window: bool = False  # a volume-model variant: window propagation (VolumeSampler), stages 1 and 2
    injection: str = ""  # window methods: how the conditions reach the U-Net (UNetConfig.injection)
    trainings: tuple[Training, ...] = ()
    train_set: str = ""  # its Table 1 set over the training masks ("": none; GEM-3D's are sampling.sets)
    test_sets: tuple[TestSet, ...] = ()  # its Table 2 sets
    table3: str = ""  # its Table 3 row (feature injection of the volume model); "": not in Table 3
    figure: str = ""  # its Fig. 2 column title; "": not in Fig. 2
    sample_keys: tuple[str, ...] = ()  # config keys its sampler reads beyond sampling.seed (sets' fingerprints)
    model_keys: tuple[str, ...] = ()  # config keys that shape its networks (a model file must agree with them)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else its own module wants to keep here

    def models(self, stage: int = 0) -> tuple[str, ...]:
        """The model files its sampler reads at `stage` (window methods: that stage's; others: all of theirs)."""
        if self.window:
            return tuple(t.model for t in self.trainings if t.stage == stage)
        return tuple(t.model for t in self.trainings)

    def test_set(self, name: str) -> TestSet:
        return next(s for s in self.test_sets if s.name == name)


def window_trainings(prefix: str, keys: tuple[str, ...] = ()) -> tuple[Training, Training]:
    """The two stages of a volume-model variant: <prefix>_stage1 (2D layers), <prefix>_stage2 (slice-axis layers);
    `keys`: the variant's own config keys beside the stage's."""
    return (Training(f"{prefix}_stage1", "train_volume_stage1", keys, stage=1),
            Training(f"{prefix}_stage2", "train_volume_stage2", keys, after=(f"{prefix}_stage1",), stage=2))


_WINDOW = dict(module="gem3d.methods.volume", section="volume_model", window=True,
               sample_keys=SOLVER_KEYS + WINDOW_KEYS,
               model_keys=("volume_model.model", "volume_model.window", "diffusion"))

BUILT_IN = (
    Method("gem3d", "GEM-3D", switch="always", informed=True, injection="concat",
           trainings=window_trainings("volume"),
           test_sets=(TestSet("test_gem3d", 2), TestSet("test_no_overlap", 2, pin=False), TestSet("test_no_stage2", 1)),
           table3="concatenation", figure="GEM-3D\n(true informed slice)", **_WINDOW),
    Method("baseline", "Make-A-Volume baseline", switch="volume_model.baseline", injection="concat",
           trainings=window_trainings("baseline"), train_set="baseline", test_sets=(TestSet("test_baseline", 2),),
           figure="Baseline\n(mask only)", **_WINDOW),
    Method("controlnet", "GEM-3D, control-branch injection", informed=True, injection="control",
           trainings=window_trainings("controlnet"), test_sets=(TestSet("test_controlnet", 2),),
           table3="control branch", **_WINDOW),
    Method("crossattn", "GEM-3D, cross-attention injection", informed=True, injection="crossattn",
           trainings=window_trainings("crossattn", ("volume_model.crossattn_encoder",)),
           test_sets=(TestSet("test_crossattn", 2),),
           table3="cross-attention", **_WINDOW),
    Method("pix2pix", "3D Pix2Pix", "gem3d.methods.pix2pix", section="pix2pix",
           trainings=(Training("pix2pix", "train_pix2pix", ("seed", "pix2pix", "data.labels"), reads="slices",
                               command="train-pix2pix", item_seconds=0.25),),
           train_set="pix2pix", test_sets=(TestSet("test_pix2pix", pin=False),), figure="3D Pix2Pix\n(mask only)",
           model_keys=("pix2pix.model", "pix2pix.volume_size")),
    Method("ldm3d", "conditional 3D LDM", "gem3d.methods.ldm3d", section="ldm3d",
           trainings=(Training("ldm3d", "train_ldm3d", ("seed", "diffusion", "ldm3d"), after=("vae",),
                               command="train-ldm3d", item_seconds=0.25),),
           train_set="ldm3d", test_sets=(TestSet("test_ldm3d", pin=False),), figure="3D LDM\n(mask only)",
           sample_keys=SOLVER_KEYS + ("ldm3d.depth",), model_keys=("ldm3d.model", "ldm3d.depth", "diffusion")),
)
METHODS: dict[str, Method] = {m.name: m for m in BUILT_IN}
_LOADED: set[str] = set()  # modules of `method_modules` already registered


def register(method: Method) -> Method:
    """Add a method (a `method_modules` module's METHOD); its names must not clash with a registered one's."""
    if not isinstance(method, Method):
        raise InputError(f"register() takes a gem3d.methods.registry.Method, got {type(method).__name__}")
    known = METHODS.get(method.name)
    if known is not None:
        if known == method:
            return known
        raise InputError(f"method {method.name!r} is registered twice ({known.module} and {method.module})")
    taken = {s for m in METHODS.values() for s in set_names(m)} | {t.model for m in METHODS.values()
                                                                    for t in m.trainings}
    clash = sorted((set_names(method) | {t.model for t in method.trainings}) & taken)
    if clash:
        raise InputError(f"method {method.name!r} ({method.module}): set or model names {clash} are taken")
    if method.window:
        raise InputError(f"method {method.name!r} ({method.module}): window methods are gem3d's volume-model "
                         "variants; an added method generates whole volumes (window: false)")
    METHODS[method.name] = method
    return method


def load_modules(names: list[str] | tuple[str, ...], source: str = "config") -> None:
    """Import every module of `method_modules` and register its METHOD (once per module)."""
    for name in names:
        if name in _LOADED:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise InputError(f"{source}: config key method_modules: cannot import {name} ({exc}); put its folder on "
                             "PYTHONPATH or install it") from None
        method = getattr(module, "METHOD", None)
        if not isinstance(method, Method):
            raise InputError(f"{source}: config key method_modules: {name} defines no METHOD = Method(...)")
        if method.module != name:
            raise InputError(f"{source}: config key method_modules: {name}'s METHOD names the module "
                             f"{method.module!r}, not {name!r}")
        register(method)
        _LOADED.add(name)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown generation method {name!r}: registered are {', '.join(METHODS)}") from None


def comparison_names() -> list[str]:
    """The methods a config switches on by listing them in `comparisons`."""
    return [m.name for m in METHODS.values() if m.switch == "comparisons"]


def is_enabled(method: Method, cfg: Any) -> bool:
    if method.switch == "always":
        return True
    if method.switch == "comparisons":
        return method.name in cfg.comparisons
    return bool(reduce(getattr, method.switch.split("."), cfg))


def enabled(cfg: Any) -> list[Method]:
    """The methods this config trains and samples, in registry order."""
    return [m for m in METHODS.values() if is_enabled(m, cfg)]


def set_names(method: Method) -> set[str]:
    return ({method.train_set} - {""}) | {s.name for s in method.test_sets}


def trainings(rule: str) -> list[tuple[Method, Training]]:
    """The (method, training) pairs a Snakemake rule trains."""
    return [(m, t) for m in METHODS.values() for t in m.trainings if t.rule == rule]


def training_keys(rule: str) -> tuple[str, ...] | None:
    """The config keys of a method's own training rule (None: not one)."""
    found = [t.keys for _, t in trainings(rule) if not t.stage]
    return found[0] if found else None


def implementation(method: Method) -> ModuleType:
    """The method's module, imported by its dotted name (it must provide check, train, sampler, budget)."""
    module = importlib.import_module(method.module)
    missing = [f for f in INTERFACE if not callable(getattr(module, f, None))]
    if missing:
        raise InputError(f"{method.module} (method {method.name}) lacks {', '.join(missing)}")
    return module


def check(cfg: Any) -> None:
    """Every enabled method's check of the config (one InputError line naming the key)."""
    for method in enabled(cfg):
        implementation(method).check(cfg, method.name)


@dataclass(frozen=True)
class Budget:
    """What a method is given, as the tables' notes state it for every row (issue #23)."""

    parameters: int  # of the network that generates (a GAN's generator; a diffusion model's denoiser)
    steps: tuple[tuple[int, int], ...]  # (optimizer steps, items per step) of each training, in order
    item: str  # what one training item is, plural: "windows of 16 slices", "whole volumes"
    resolution: str  # what the network sees, e.g. "64x64 latents (4 ch) of 512x512 slices"
    resampling: str  # how the data reach that resolution and back ("none" if not at all)
    other: str = ""  # anything else (a GAN's discriminator, frozen encoders, networks imported instead of trained)
    slices_per_item: int = 0  # slices in one training item (a window's, a whole volume's depth); 0: not stated

    @property
    def samples(self) -> int:
        """Training items seen: the sum of steps x items over the trainings."""
        return sum(s * b for s, b in self.steps)

    @property
    def slices(self) -> int:
        """Slices seen: training items x their slices (0 when the items' depth is not stated)."""
        return self.samples * self.slices_per_item

    def text(self) -> str:
        steps = " + ".join(f"{s:,} x {b}" for s, b in self.steps)
        slices = f", {self.slices:,} slices" if self.slices else ""
        trained = (f"{steps} optimizer steps x batch ({self.samples:,} {self.item} seen{slices})" if self.steps
                   else "no optimizer step")
        other = f"; {self.other}" if self.other else ""
        return (f"{self.parameters / 1e6:.2f} M parameters; {trained}; {self.resolution}; resampling: "
                f"{self.resampling}{other}")

    def ratios(self, reference: Budget) -> str:
        """Parameters, training items and (where both state them) slices seen, as multiples of `reference`'s (a
        whole volume and a window are both one item: the slices say how much data each saw)."""
        def times(a: int, b: int) -> str:
            return f"x{a / b:.2f}" if b else "x-"

        text = (f"{times(self.parameters, reference.parameters)} GEM-3D's parameters, "
                f"{times(self.samples, reference.samples)} its training items")
        if self.slices and reference.slices:
            text += f", {times(self.slices, reference.slices)} its slices"
        return text


def budget(cfg: Any, name: str) -> Budget:
    return implementation(get(name)).budget(cfg, name)
