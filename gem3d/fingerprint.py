"""Is this result still valid? The fingerprint of what defines each stage's output.

A stage's output is defined by the config keys the stage reads (`STAGE_KEYS`) and by the files it
reads. Three places ask this one module, so they agree:

- the Snakefile gives every rule `params: fingerprint=config_digest(CFG, rule)`: editing a key a
  rule reads reruns that rule (and, through its new outputs, everything downstream), editing
  another key reruns nothing, and the same content under another path or in a moved checkout
  reruns nothing (the config file's path is not a param);
- training resumes a saved state only while `stage_fingerprint(cfg, stage, inputs)` equals the
  one stored in it (`steps` excepted: a longer run resumes), otherwise it starts over;
- sampling refuses a model file whose stored fingerprint differs from the config in a key that
  shapes the network (`first_difference` names the key).

Keys that change how a stage runs but not what it computes (worker counts, log and checkpoint
intervals, batching of sampling, compile/memory-format switches) are left out (`EXECUTION_KEYS`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

# The config keys (dotted paths, whole sections allowed) that define each Snakemake rule's output.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "make_phantoms": ("phantoms", "data.path"),
    "import_data": ("seed", "data"),
    "preprocess_nnunet": ("preprocess.dataset_id", "preprocess.configuration"),
    "build_slices": ("preprocess.slice_size", "preprocess.slice_fit", "preprocess.intensity",
                     "preprocess.configuration", "data.labels"),
    "train_vae": ("seed", "vae"),
    "encode_latents": (),
    "train_slice_model": ("seed", "diffusion", "slice_model"),
    "train_volume_stage1": ("seed", "diffusion", "volume_model.window", "volume_model.model",
                            "volume_model.stage1"),
    "train_volume_stage2": ("seed", "diffusion", "volume_model.window", "volume_model.model",
                            "volume_model.stage2", "volume_model.stage2_timesteps"),
    # a network given as a file (gem3d/training/imported.py; the rule's param is per model: import_digest)
    "import_network": ("diffusion", "volume_model.window", "volume_model.model", "volume_model.pretrained",
                       "volume_model.baseline_pretrained", "volume_model.pretrained_weights", "slice_model.model",
                       "slice_model.position_dim", "slice_model.pretrained", "slice_model.pretrained_weights",
                       "vae.model"),
    # the generation methods' own training rules (train_pix2pix, train_ldm3d, ...): their registry entries' keys
    # every set's shards; the keys each set reads beyond these: gem3d.sampling.sets.set_config_keys
    "sample_shard": ("data.labels", "data.modality"),
    "merge_samples": ("data.labels", "data.modality"),  # a set's kind comes with its name; its shards are inputs
    "generate": ("generation", "sampling", "augmentation", "diffusion", "volume_model.window", "slice_model.position_dim",
                 "data.labels", "data.modality", "preprocess.configuration"),
    # evaluation (gem3d/evaluation/): its own keys and the sample-set keys that say which sets it reads
    "evaluate_generation": ("evaluation.fid_extractor", "evaluation.fid_weights", "sampling.sets",
                            "volume_model.baseline", "comparisons"),
    "evaluate_fidelity": ("evaluation.lpips_net", "evaluation.lpips_backbone_weights", "evaluation.lpips_lin_weights",
                          "volume_model.baseline", "comparisons"),
    # downstream rows: the keys shared by every row (each rule's params add its own row's definition)
    "prepare_segmentation": ("evaluation.segmentation.configuration", "evaluation.segmentation.batch_size",
                             "evaluation.segmentation.base_features",
                             "data.labels", "data.format", "preprocess.dataset_id"),
    "train_segmentation": ("evaluation.segmentation.configuration", "evaluation.segmentation.epochs",
                           "evaluation.segmentation.iterations_per_epoch", "evaluation.segmentation.val_iterations",
                           "evaluation.segmentation.test_time_mirroring", "data.labels", "data.format",
                           "preprocess.dataset_id", "seed"),
    "evaluate_adherence": ("evaluation.segmentation.min_adherence", "evaluation.segmentation.test_time_mirroring",
                           "data.labels", "data.format"),
    "evaluate_segmentation": ("evaluation.segmentation", "data.labels", "data.format",
                              "sampling.enhancement_multiples", "volume_model.baseline"),
    "evaluate_privacy": ("evaluation.privacy_quantile", "sampling.sets", "sampling.enhancement_set",
                         "sampling.enhancement_multiples", "volume_model.baseline", "comparisons"),
    # report (gem3d/report/): every figure's data note (phantoms, data.format, data.path) and what it draws
    "figure_fig2_comparison": ("phantoms", "data.format", "data.path", "volume_model.baseline", "comparisons"),
    "figure_fig3_counterfactual": ("phantoms", "data.format", "data.path", "sampling", "augmentation", "diffusion",
                                   "volume_model.window", "slice_model.position_dim", "data.labels", "data.modality"),
    "figure_fig4_deenhancement": ("phantoms", "data.format", "data.path"),
    "figure_fig5_overlap_ablation": ("phantoms", "data.format", "data.path", "sampling.overlap", "volume_model.window"),
    "figure_fig6_stage2_ablation": ("phantoms", "data.format", "data.path"),
    "figure_fig7_samples": ("phantoms", "data.format", "data.path", "sampling.sets"),
    "figure_training_curves": ("phantoms", "data.format", "data.path", "volume_model.baseline"),
    "figure_informed_fit": ("phantoms", "data.format", "data.path", "sampling.seed", "sampling.fit"),
    "figure_downstream": ("phantoms", "data.format", "data.path", "evaluation.segmentation"),
    "figure_segmentation_curves": ("phantoms", "data.format", "data.path"),
    "figure_adherence": ("phantoms", "data.format", "data.path", "evaluation.segmentation.min_adherence"),
    "render_tables": ("phantoms", "data.format", "data.path"),
}

# Keys of training sections (vae.train, slice_model.train, volume_model.stage1/2) that do not change
# what is learned, and dotted keys elsewhere with the same property.
TRAIN_EXECUTION_KEYS = ("log_every", "checkpoint_every", "num_workers", "compile", "channels_last",
                        "grad_checkpointing", "micro_batch")  # micro_batch: the global batch stays, only its split
TRAIN_SECTIONS = ("vae.train", "slice_model.train", "volume_model.stage1", "volume_model.stage2", "pix2pix.train",
                  "ldm3d.train")
# ... except where the split changes what is learned: the VAE draws its posterior noise per micro-batch and
# computes the adversarial term's adaptive weight per micro-batch (its items are the same for every split)
SPLIT_DEFINES = ("vae.train",)
EXECUTION_KEYS = ("preprocess.num_processes", "sampling.shards", "sampling.volumes_per_batch",
                  "sampling.max_batch_windows", "evaluation.fid_batch_size", "evaluation.segmentation.num_processes")


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively (a YAML list and a code tuple compare equal)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"config has no key {dotted!r}")
        node = node[part]
    return node


def _get_or(tree: Mapping[str, Any], dotted: str, default: Any) -> Any:
    try:
        return _get(tree, dotted)
    except KeyError:
        return default


def _drop(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = tree
    for part in parents:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(last, None)


def config_keys(cfg: Any, keys: tuple[str, ...], *, drop_steps: bool = False) -> dict[str, Any]:
    """{dotted key: value} for `keys` of `cfg` (a Config or a plain dict), execution-only keys removed.

    `drop_steps` also removes the training sections' `steps` (a training state trained to N steps
    is a valid start for a run to M > N steps), except where the section's lr decays (`lr_decay` > 0): its
    schedule depends on the total steps, so an N-step state ran the wrong schedule for M.
    """
    tree = _plain(cfg)
    for section in TRAIN_SECTIONS:
        decays = bool(_get_or(tree, f"{section}.lr_decay", 0.0))
        for key in TRAIN_EXECUTION_KEYS + (("steps",) if drop_steps and not decays else ()):
            if not (key == "micro_batch" and section in SPLIT_DEFINES):
                _drop(tree, f"{section}.{key}")
    for dotted in EXECUTION_KEYS:
        _drop(tree, dotted)
    return {key: _get(tree, key) for key in keys}


def digest(obj: Any, n_chars: int = 16) -> str:
    """Short SHA-256 of the canonical JSON of `obj` (key order and tuple/list do not matter)."""
    text = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n_chars]


def config_digest(cfg: Any, stage: str, extra: tuple[str, ...] = ()) -> str:
    """The Snakefile's rerun param of rule `stage`: digest of the keys it reads (`extra`: the keys one job of
    the rule reads beyond the rule's, e.g. a sample set's: gem3d.sampling.sets.set_config_keys)."""
    keys = stage_keys(stage)
    return digest(config_keys(cfg, keys + tuple(k for k in extra if k not in keys)))


def stage_keys(stage: str) -> tuple[str, ...]:
    """The config keys of a rule: STAGE_KEYS', or a generation method's own training rule's (its registry entry)."""
    from gem3d.methods.registry import training_keys

    keys = STAGE_KEYS.get(stage, training_keys(stage))
    if keys is None:
        raise KeyError(f"no fingerprint keys declared for stage {stage!r} (add it to gem3d.fingerprint.STAGE_KEYS or "
                       "to its method's Training in gem3d/methods/registry.py)")
    return keys


def import_keys(model: str) -> tuple[str, ...]:
    """The config keys that define the model file imported for `model` (slice_model, volume_stage1/2,
    baseline_stage1/2), besides the file itself: the keys its checks read."""
    if model == "slice_model":
        return ("diffusion", "slice_model.model", "slice_model.position_dim", "slice_model.pretrained_weights",
                "vae.model")
    return ("diffusion", "volume_model.window", "volume_model.model", "volume_model.pretrained_weights", "vae.model")


def import_digest(cfg: Any, model: str) -> str:
    """The Snakefile's rerun param of the import of `model`: `import_keys` and its own pretrained entry only (a
    change to another network's file reruns nothing here)."""
    return digest({**config_keys(cfg, import_keys(model)), "pretrained": cfg.pretrained(model)})


def stage_fingerprint(cfg: Any, stage: str, inputs: Mapping[str, str] | None = None,
                      extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """What defines a training state: its config keys (without `steps`; `extra`: one job's beyond the rule's, as in
    `config_digest`) and digests of its input files."""
    keys = stage_keys(stage)
    keys += tuple(k for k in extra if k not in keys)
    return {"config": config_keys(cfg, keys, drop_steps=True), "inputs": dict(inputs or {})}


def first_difference(saved: Any, now: Any, where: str = "") -> str | None:
    """The first (sorted) key whose value differs, as 'key: saved != now'; None when equal."""
    saved, now = _plain(saved), _plain(now)
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now)):
            sub = f"{where}.{key}" if where else key
            if key not in saved or key not in now:
                return f"{sub}: {saved.get(key, '<absent>')!r} != {now.get(key, '<absent>')!r}"
            found = first_difference(saved[key], now[key], sub)
            if found:
                return found
        return None
    if saved != now:
        return f"{where or '<value>'}: {saved!r} != {now!r}"
    return None


def store_digest(index: Mapping[str, Any]) -> str:
    """Digest of a slice store's or latent cache's index.json (which records per-case content digests)."""
    return digest(index)


# The config keys that shape each trained network: a model file must agree with the config on these
# to be used for sampling (its training-only keys, e.g. lr or steps, may differ).
MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "vae": ("vae.model",),
    "slice_model": ("slice_model.model", "slice_model.position_dim", "diffusion"),
    "volume": ("volume_model.model", "volume_model.window", "diffusion"),
}  # and every generation method's (pix2pix, ldm3d, ...): its registry entry's `model_keys` (`model_keys`)


def model_keys(role: str) -> tuple[str, ...]:
    from gem3d.methods.registry import METHODS

    if role in MODEL_KEYS:
        return MODEL_KEYS[role]
    if role in METHODS and METHODS[role].model_keys:
        return METHODS[role].model_keys
    raise KeyError(f"no model keys for {role!r}")


def _tree(flat: Mapping[str, Any]) -> dict:
    """{"a.b": 1, "c": {...}} -> {"a": {"b": 1}, "c": {...}}."""
    tree: dict = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _plain(value)
    return tree


def check_model_config(payload: Mapping[str, Any], cfg: Any, role: str, path: Any) -> None:
    """Refuse (one-line InputError) a model file trained with another network config than `cfg`.

    `payload` is the loaded model file; its "fingerprint" holds the config keys it was trained
    with. Files without a fingerprint (built by hand, not by gem3d's training) are not checked.
    """
    from gem3d.io import InputError

    saved = (payload.get("fingerprint") or {}).get("config")
    if saved is None:
        return
    saved_tree = _tree(saved)
    try:
        saved_keys = {key: _get(saved_tree, key) for key in model_keys(role)}
    except KeyError:
        raise InputError(f"{path}: not a {role} model (its training config has no {model_keys(role)})") from None
    diff = first_difference(saved_keys, config_keys(cfg, model_keys(role)))
    if diff is not None:
        raise InputError(f"{path}: trained with another config than {getattr(cfg, 'source', 'the config')}: {diff} "
                         "(model != config); retrain it or use the config it was trained with")
