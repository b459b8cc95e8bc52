"""Networks that come from files instead of trainings: where a configured file is, and what it is.

Keys (`Config.pretrained(model)` reads them): `vae.pretrained`, `slice_model.pretrained`,
`volume_model.pretrained.{stage1,stage2}`, `volume_model.baseline_pretrained.{stage1,stage2}`. Each names
- a run of the GEM-3D authors' release (a latent-diffusion PyTorch Lightning log folder): the folder
  `<run>` (with `checkpoints/last.ckpt` and `configs/<timestamp>-project.yaml`), or a checkpoint inside its
  `checkpoints/` folder; the yaml holds the network's hyper-parameters, so a checkpoint without it is refused;
- or a gem3d model file (`results/<name>/models/*.pt`, e.g. from a bundle written by `gem3d export`).
The Snakefile makes these files inputs of the rule that would otherwise train the network (a changed file
reruns it); gem3d/training/imported.py turns them into the run's model files. Torch-free (the Snakefile
imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gem3d.io import InputError

UNET_TARGETS = {  # unet_config.target -> slice-axis layers (the authors' pseudo-3D UNet)
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": False,
    "ldm.modules.diffusionmodules.openaimodel_pseudo3D.UNetModel": True,
}


@dataclass(frozen=True)
class ReleaseRun:
    """A release run: its checkpoint and the model section of its project yaml."""

    checkpoint: Path
    project_yaml: Path
    model: dict  # the yaml's `model` mapping

    @property
    def params(self) -> dict:
        return self.model.get("params") or {}

    @property
    def unet_params(self) -> dict:
        return (self.params.get("unet_config") or {}).get("params") or {}

    @property
    def pseudo3d(self) -> bool:
        return UNET_TARGETS.get((self.params.get("unet_config") or {}).get("target"), False)

    @property
    def scale_factor(self) -> float:
        return float(self.params.get("scale_factor", 1.0))

    @property
    def conditioning(self) -> str | None:
        return self.params.get("conditioning_key")


def run_folder(path: str | Path) -> Path | None:
    """The release run `path` belongs to (a folder with configs/, or a checkpoint in its checkpoints/); None
    for anything else (a gem3d model file)."""
    path = Path(path)
    run = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
    return run if run is not None and (run / "configs").is_dir() else None


def find_run(path: str | Path, need_unet: bool = True) -> ReleaseRun:
    """The run of a folder `<run>` or a checkpoint `<run>/checkpoints/*.ckpt`; refuses one without its yaml
    (and, with `need_unet`, one whose yaml describes no UNet gem3d can build)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        run, checkpoint = path, path / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise InputError(f"{path}: not a release run folder (no checkpoints/last.ckpt)")
    elif path.is_file():
        run, checkpoint = path.parent.parent, path
        if path.parent.name != "checkpoints":
            raise InputError(f"{path}: a checkpoint outside a run's checkpoints/ folder: its configs/*-project.yaml "
                             "(the network hyper-parameters) cannot be found; give the run folder")
    else:
        raise InputError(f"{path}: release run not found")
    yamls = sorted((run / "configs").glob("*-project.yaml"))
    if not yamls:
        raise InputError(f"{run}: no configs/*-project.yaml (the network hyper-parameters); nothing is guessed")
    project = yamls[-1]  # Lightning writes one per launch; the newest describes the checkpoint
    try:
        model = (yaml.safe_load(project.read_text()) or {}).get("model")
    except yaml.YAMLError as exc:
        raise InputError(f"{project}: not readable as YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise InputError(f"{project}: no model.params section (not a latent-diffusion project yaml)")
    target = (model["params"].get("unet_config") or {}).get("target")
    if need_unet and target not in UNET_TARGETS:
        raise InputError(f"{project}: model.params.unet_config.target {target!r} is not one of "
                         f"{sorted(UNET_TARGETS)}")
    return ReleaseRun(checkpoint, project, model)


def input_files(path: str | Path | None) -> list[str]:
    """The files a rule reads for a configured pretrained path: a release run's checkpoint and yaml, or the
    file itself ([] for None). A path that does not exist is returned as given (the rule's job says so)."""
    if path is None:
        return []
    run = run_folder(path)
    if run is None:
        return [str(path)]
    checkpoint = Path(path) if Path(path).is_file() else run / "checkpoints" / "last.ckpt"
    return [str(checkpoint)] + [str(p) for p in sorted((run / "configs").glob("*-project.yaml"))[-1:]]
