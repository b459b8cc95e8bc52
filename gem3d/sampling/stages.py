"""`gem3d sample`, `gem3d merge-samples`, `gem3d counterfactual`: the sampling stages."""

from __future__ import annotations

from pathlib import Path

from gem3d.commands import Arg, Command
from gem3d.config import Config


def sample(cfg: Config, set_name: str, shard: int = 0, shards: int = 1) -> None:
    """Generate one shard of a sample set (IC, IC_MA, IG, IG_MA, baseline, copies, test sets, deenhanced)."""
    from gem3d.sampling.sample_sets import sample_set

    sample_set(cfg, set_name, shard, shards)


def merge_samples(cfg: Config, set_name: str, shards: int = 1) -> None:
    """Merge the shards of a set into results/<name>/samples/<set>/."""
    from gem3d.sampling.sample_sets import merge_shards

    merge_shards(cfg, set_name, shards)


def make_counterfactual(cfg: Config, mask: Path, informed: str, out: Path, seed: int = 0, start: int | None = None,
                        informed_image: Path | None = None) -> None:
    from gem3d.sampling.counterfactual import counterfactual

    counterfactual(cfg, mask, informed, out, seed, start, informed_image)


SET_ARG = Arg(("--set",), dict(required=True, dest="set_name", help="sample set name (see gem3d/sampling/sample_sets.py)"))
SHARDS_ARG = Arg(("--shards",), dict(type=int, default=1, dest="shards", help="number of shards of the set"))

COMMANDS = {
    "sample": Command(sample, "generate one shard of a sample set (one volume per mask)",
                      args=(SET_ARG, Arg(("--shard",), dict(
                          type=int, default=0, dest="shard", help="which shard of the set to generate (0 .. shards-1)")), SHARDS_ARG)),
    "merge-samples": Command(merge_samples, "merge the shards of a sample set into one dataset",
                             args=(SET_ARG, SHARDS_ARG)),
    "counterfactual": Command(
        make_counterfactual, "generate a volume from an edited mask and a chosen informed slice",
        args=(Arg(("--mask",), dict(type=Path, required=True, dest="mask", help="edited mask on a case's grid")),
              Arg(("--informed",), dict(default="", dest="informed",
                                        help="CASE:SLICE of the dataset, or a slice index (the file's third "
                                             "axis) of --informed-image; empty: its middle slice")),
              Arg(("--informed-image",), dict(type=Path, default=None, dest="informed_image",
                                              help="a 2D or 3D NIfTI of your own as the informed slice (scaled like "
                                                   "a training volume, resampled in-plane to the training "
                                                   "voxel size)")),
              Arg(("--out",), dict(type=Path, required=True, dest="out",
                                   help="output NIfTI file (.nii.gz or .nii); its record goes next to it as .json")),
              Arg(("--seed",), dict(type=int, default=0, dest="seed", help="seed of the generation noise")),
              Arg(("--start",), dict(type=int, default=None, dest="start", help="first window position")))),
}
