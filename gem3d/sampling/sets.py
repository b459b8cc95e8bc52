"""Sample sets: their names, what each one is, and read access to a generated set.

The one place that turns a config into set names (the sampler, the evaluation, the report and the Snakemake
rules all ask here; importing this module does not load torch); each generation method's own sets come from
its entry in gem3d/methods/registry.py. A set lives in
`Paths.samples(name)`:

    manifest.json                 {"set", "kind", "volumes": [{"sample_id", "source_case", "copy", "informed",
                                   "start", "augmentation", "seed", "variant", "stage", "pin", "checkpoints"}]}
    slices/<id>.npz               image (d, s, s) float16 in [-1, 1], label (d, s, s) int8 (slice-store space)
    imagesTr/<id>_0000.nii.gz     generated image in the ORIGINAL geometry of its mask
    labelsTr/<id>.nii.gz          its mask (labels 0..K), same geometry
    dataset.json                  nnU-Net v2 raw dataset description

Names:
- "baseline" (when `volume_model.baseline`) and every key of `sampling.sets` (IC, IC_MA, IG, IG_MA):
  one volume per training mask (kind "train_masks"; Table 1);
- "<enhancement_set>_copy<k>": further copies of the enhancement set (`sampling.enhancement_set`,
  default IC: the TRUE masks, as the paper's Appendix E; each copy with other informed slices than
  the earlier copies of the same mask, and other seeds; a set with `augment` gives augmented masks
  instead); the kx enhanced dataset is the set plus copies 1..k-1;
- "test_gem3d", "test_baseline", "test_no_overlap", "test_no_stage2": test masks with their true
  informed slice (kind "test_true"; Table 2 and the ablations);
- the other methods' (`comparisons`, registry entries' train_set and test_sets): "pix2pix", "ldm3d"
  (training masks, Table 1) and "test_pix2pix", "test_ldm3d" (test masks; these take no informed slice: they
  cannot decouple the conditions), "test_controlnet", "test_crossattn" (test masks with their true informed
  slice, the volume model with another feature injection; Table 3);
- "deenhanced": every training mask with one fixed informed slice, placed at that slice's relative
  depth in each mask (kind "deenhance").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gem3d.config import Config
from gem3d.io import InputError, read_json
from gem3d.methods import registry
from gem3d.paths import Paths

TRAIN_MASKS, TEST_TRUE, DEENHANCE = "train_masks", "test_true", "deenhance"


@dataclass(frozen=True)
class SetSpec:
    name: str
    kind: str  # TRAIN_MASKS | TEST_TRUE | DEENHANCE
    variant: str = "gem3d"  # the generation method (gem3d.methods.registry name)
    stage: int = 2  # the volume-model stage sampled; 0 for a method without stages
    pin: bool = True
    informed: str = "IC"  # IC | IG | true | fixed | none
    augment: bool = False
    copy: int = 0


def model_name(variant: str, stage: int = 0) -> str:
    """The model file (Paths.model) a method samples with at `stage`: volume_stage2, baseline_stage1,
    controlnet_stage2, crossattn_stage2, pix2pix, ldm3d (a method without a model file: InputError)."""
    method = registry.METHODS.get(variant)
    names = method.models(stage) if method is not None and (stage in (1, 2)) == method.window else ()
    if len(names) != 1:
        window = "|".join(m.name for m in registry.METHODS.values() if m.window)
        whole = "|".join(m.name for m in registry.METHODS.values() if not m.window and len(m.trainings) == 1)
        raise InputError(f"unknown model {variant!r} stage {stage}: use {window} with stage 1|2, or {whole}")
    return names[0]


def generation_sets(cfg: Config) -> list[str]:
    """Table 1 rows: the enabled methods' sets over the training masks (baseline, pix2pix, ldm3d, ...) in registry
    order, then every `sampling.sets` key (GEM-3D's)."""
    return [m.train_set for m in registry.enabled(cfg) if m.train_set] + list(cfg.sampling.sets)


def volume_variants(cfg: Config) -> list[str]:
    """The volume diffusion models this config trains (each in two stages)."""
    return [m.name for m in registry.enabled(cfg) if m.window]


def trained_models(cfg: Config) -> list[str]:
    """The model files this config trains (networks given as files, `*.pretrained`, are imported instead): the
    VAE, the slice model and both stages of GEM-3D and the baseline; a stage 1 only while its stage 2 is trained
    from it or a test set samples it (the stage-2 ablation)."""
    names = [m for m in ("vae", "slice_model") if not cfg.pretrained(m)]
    specs = [set_spec(cfg, name) for name in test_sets(cfg)]
    sampled = {model_name(spec.variant, spec.stage) for spec in specs if registry.get(spec.variant).window}
    for variant in ("gem3d", "baseline"):
        if variant not in volume_variants(cfg):
            continue
        stage1, stage2 = model_name(variant, 1), model_name(variant, 2)
        if not cfg.pretrained(stage1) and (not cfg.pretrained(stage2) or stage1 in sampled):
            names.append(stage1)
        if not cfg.pretrained(stage2):
            names.append(stage2)
    return names


def method_models(cfg: Config) -> list[str]:
    """The model files of the enabled methods that have a training rule of their own (pix2pix, ldm3d, ...)."""
    return [t.model for m in registry.enabled(cfg) if not m.window for t in m.trainings]


def enhancement_copies(cfg: Config) -> list[str]:
    """Extra copies of the enhancement set: `<set>_copy1 .. <set>_copy{max(multiples) - 1}`."""
    name = cfg.sampling.enhancement_set
    return [f"{name}_copy{k}" for k in range(1, max(cfg.sampling.enhancement_multiples))]


def enhanced_sets(cfg: Config, multiple: int) -> list[str]:
    """The sets forming the enhanced "<multiple>x" dataset (copy 0 is the set itself)."""
    if multiple not in cfg.sampling.enhancement_multiples:
        raise InputError(f"{cfg.source}: enhancement multiple {multiple} is not in sampling.enhancement_multiples "
                         f"{list(cfg.sampling.enhancement_multiples)}")
    return [cfg.sampling.enhancement_set] + enhancement_copies(cfg)[: multiple - 1]


@dataclass(frozen=True)
class DownstreamRow:
    """A training data of the downstream nnU-Net (a Table 4 row): the real training cases or not, the sample sets
    added, how many generated copies per training mask, which generator, and whether volumes the real-data
    nnU-Net finds far from their masks are left out (`evaluation.segmentation.min_adherence`)."""

    real: bool
    sets: tuple[str, ...]
    copies: int
    method: str | None  # "gem3d" | "baseline" | None (real only)
    label: str
    adherent: bool = False


def downstream_rows(cfg: Config) -> dict[str, DownstreamRow]:
    """Table 4 rows: "real"; "enhanced_<k>x" (GEM-3D's k copies per mask, synthetic only); "baseline"
    (Make-A-Volume, synthetic only); "real_enhanced_<k>x" for k in `evaluation.segmentation.real_plus` (real + k
    copies); with `min_adherence`, "enhanced_<K>x_adherent" (the largest multiple K, adherent volumes only)."""
    seg = cfg.evaluation.segmentation
    rows = {"real": DownstreamRow(True, (), 0, None, "real")}
    multiples = sorted(set(cfg.sampling.enhancement_multiples))
    rows.update({f"enhanced_{k}x": DownstreamRow(False, tuple(enhanced_sets(cfg, k)), k, "gem3d",
                                                 f"GEM-3D {k}x (synthetic only)") for k in multiples})
    if cfg.volume_model.baseline:
        rows["baseline"] = DownstreamRow(False, ("baseline",), 1, "baseline", "baseline 1x (synthetic only)")
    rows.update({f"real_enhanced_{k}x": DownstreamRow(True, tuple(enhanced_sets(cfg, k)), k, "gem3d",
                                                      f"real + GEM-3D {k}x") for k in sorted(set(seg.real_plus))})
    if seg.min_adherence is not None:
        k = multiples[-1]
        rows[f"enhanced_{k}x_adherent"] = DownstreamRow(
            False, tuple(enhanced_sets(cfg, k)), k, "gem3d",
            f"GEM-3D {k}x (synthetic only), adherence >= {seg.min_adherence:g}", adherent=True)
    return rows


def downstream_offsets(cfg: Config) -> dict[str, int]:
    """Table 4 row -> the offset of its nnU-Net dataset id from preprocess.dataset_id (unique per row)."""
    out = {}
    for name in downstream_rows(cfg):
        if name in ("real", "baseline"):
            out[name] = 1 if name == "real" else 2
            continue
        k = int(re.search(r"_(\d+)x", name).group(1))
        out[name] = k + (20 if name.startswith("real_") else 30 if name.endswith("_adherent") else 10)
    return out


def downstream_sets(cfg: Config) -> dict[str, list[str]]:
    """Training data of the downstream nnU-Net (Table 4 rows) -> the sample sets it is made of ("real": none)."""
    return {name: list(r.sets) for name, r in downstream_rows(cfg).items()}


def adherence_sets(cfg: Config) -> list[str]:
    """The generated sets of the downstream rows, whose mask adherence the real-data nnU-Net measures."""
    return list(dict.fromkeys(s for r in downstream_rows(cfg).values() for s in r.sets))


def test_sets(cfg: Config) -> list[str]:
    """Table 2 and 3 rows: the test sets of every enabled method, in registry order (GEM-3D's with its ablations
    first)."""
    return [s.name for m in registry.enabled(cfg) for s in m.test_sets]


def injection_sets(cfg: Config) -> dict[str, str]:
    """Table 3 rows (feature injection -> test set) when a variant other than concatenation is trained."""
    rows = {m.table3: m.test_sets[0].name for m in registry.enabled(cfg) if m.table3}
    return rows if len(rows) > 1 else {}


def figure_sets(cfg: Config) -> dict[str, str]:
    """Fig. 2 columns after the mask and the real volume: test set -> column title, the methods without an informed
    slice first, GEM-3D last."""
    methods = [m for m in registry.enabled(cfg) if m.figure]
    methods = [m for m in methods if m.name != "gem3d"] + [m for m in methods if m.name == "gem3d"]
    return {m.test_sets[0].name: m.figure for m in methods}


def privacy_sets(cfg: Config) -> list[str]:
    """Every train_masks set and the enhancement copies."""
    return generation_sets(cfg) + enhancement_copies(cfg)


def set_names(cfg: Config) -> list[str]:
    """Every set the workflow generates for this config."""
    return privacy_sets(cfg) + ["deenhanced"] + test_sets(cfg)


def method_of(cfg: Config, name: str) -> registry.Method | None:
    """The enabled method that makes set `name` as its own (not GEM-3D's sampling.sets, copies, de-enhancement)."""
    for method in registry.enabled(cfg):
        if name == method.train_set or any(s.name == name for s in method.test_sets):
            return method
    return None


def set_spec(cfg: Config, name: str) -> SetSpec:
    s = cfg.sampling
    method = method_of(cfg, name)
    if method is not None and name == method.train_set:
        stage = 2 if method.window else 0
        return SetSpec(name, TRAIN_MASKS, variant=method.name, stage=stage, pin=method.window,
                       informed="IC" if method.informed else "none")
    if method is not None:
        test = method.test_set(name)
        return SetSpec(name, TEST_TRUE, variant=method.name, stage=test.stage, pin=test.pin,
                       informed="true" if method.informed else "none")
    if name in s.sets:
        return SetSpec(name, TRAIN_MASKS, informed=s.sets[name]["informed"], augment=s.sets[name].get("augment", False))
    m = re.fullmatch(r"(.+)_copy(\d+)", name)
    if m and name in enhancement_copies(cfg):
        base = s.sets[s.enhancement_set]
        return SetSpec(name, TRAIN_MASKS, informed=base["informed"], augment=base.get("augment", False),
                       copy=int(m.group(2)))
    if name == "deenhanced":
        return SetSpec(name, DEENHANCE, informed="fixed")
    raise InputError(f"unknown sample set {name!r}; this config has {set_names(cfg)}")


SOLVER_KEYS = registry.SOLVER_KEYS


def set_config_keys(cfg: Config, name: str) -> tuple[str, ...]:
    """The config keys sample set `name` reads (beyond gem3d.fingerprint.STAGE_KEYS["sample_shard"], which every
    set reads, and its model files): the fingerprint of its shards, so an edit resamples only the sets that read
    it. Every set: sampling.seed (its volumes' seeds and start slices); then its method's sampler keys
    (`Method.sample_keys`: a diffusion sampler's solver keys, the window propagation's overlap and window); IG: the
    slice model's position code; its own sampling.sets entry (an enhancement copy: its base set's and
    sampling.enhancement_set); IC: the fit guard; augmented masks: augmentation; de-enhancement: its fixed slice."""
    spec = set_spec(cfg, name)
    keys = ["sampling.seed", *registry.get(spec.variant).sample_keys]
    if spec.informed == "IG":
        keys.append("slice_model.position_dim")
    if spec.copy:
        keys += ["sampling.enhancement_set", f"sampling.sets.{cfg.sampling.enhancement_set}"]
    elif name in cfg.sampling.sets:
        keys.append(f"sampling.sets.{name}")
    if spec.informed == "IC":
        keys.append("sampling.fit")
    if spec.augment:
        keys.append("augmentation")
    if spec.kind == DEENHANCE:
        keys.append("sampling.deenhance_informed")
    return tuple(keys)


@dataclass(frozen=True)
class SampleSet:
    """Read access to one generated set (manifest checked on opening)."""

    name: str
    root: Path
    kind: str
    volumes: list[dict]

    @classmethod
    def open(cls, cfg: Config, name: str, kind: str | None = None) -> "SampleSet":
        root = Paths(cfg).samples(name)
        path = root / "manifest.json"
        if not path.is_file():
            raise InputError(f"{path}: sample set {name} not found (run `gem3d sample --set {name}` and "
                             f"`gem3d merge-samples --set {name}` first)")
        manifest = read_json(path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("volumes"), list):
            raise InputError(f"{path}: not a sample set manifest (needs a 'volumes' list)")
        if kind is not None and manifest.get("kind") != kind:
            raise InputError(f"{path}: sample set {name} has kind {manifest.get('kind')!r}, expected {kind!r}")
        if not manifest["volumes"]:
            raise InputError(f"{path}: sample set {name} is empty (no volumes)")
        for i, entry in enumerate(manifest["volumes"]):
            missing = [k for k in ("sample_id", "source_case") if k not in entry]
            if missing:
                raise InputError(f"{path}: volume {i} lacks {', '.join(missing)}")
        return cls(name, root, str(manifest.get("kind")), manifest["volumes"])

    def by_case(self) -> dict[str, list[dict]]:
        """Source case -> its volumes (copies), in manifest order."""
        out: dict[str, list[dict]] = {}
        for v in self.volumes:
            out.setdefault(v["source_case"], []).append(v)
        return out

    def first(self, case_id: str) -> dict:
        """The first volume generated from a case's mask."""
        for v in self.volumes:
            if v["source_case"] == case_id:
                return v
        raise InputError(f"{self.root / 'manifest.json'}: sample set {self.name} has no volume of case {case_id}")

    def slices_path(self, entry: dict) -> Path:
        return self.root / "slices" / f"{entry['sample_id']}.npz"

    def image_path(self, entry: dict) -> Path:
        return self.root / "imagesTr" / f"{entry['sample_id']}_0000.nii.gz"

    def label_path(self, entry: dict) -> Path:
        return self.root / "labelsTr" / f"{entry['sample_id']}.nii.gz"

    def load(self, entry: dict, slice_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image (d, s, s) float32, label (d, s, s) int8) of one volume in slice space.

        With `slice_size` the slices must be `slice_size x slice_size` (the slice store's geometry).
        """
        path = self.slices_path(entry)
        try:
            with np.load(path) as data:
                image = np.asarray(data["image"], dtype=np.float32)
                label = np.asarray(data["label"]).astype(np.int8)
        except FileNotFoundError:
            raise InputError(f"{path}: slices of sample {entry['sample_id']} (set {self.name}) not found") from None
        except (KeyError, ValueError, OSError) as exc:
            raise InputError(f"{path}: cannot read sample slices ({type(exc).__name__}: {exc})".splitlines()[0]) \
                from exc
        if image.ndim != 3 or image.shape != label.shape:
            raise InputError(f"{path}: image {image.shape} and label {label.shape} must be equal (d, s, s) arrays")
        if slice_size is not None and image.shape[1:] != (slice_size, slice_size):
            raise InputError(
                f"{path}: set {self.name} has {image.shape[1]}x{image.shape[2]} slices but the slice store has "
                f"{slice_size}x{slice_size} (different slice geometry: generated with another preprocess.slice_size?)")
        return image, label
