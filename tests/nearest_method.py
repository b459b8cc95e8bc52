"""A toy generation method added the documented way (docs/architecture.md, "Adding a generation method"): this one
file, listed in a config's `method_modules` and its name in `comparisons` (tests/test_dag_smoke.py runs it through
the whole DAG; tests/test_methods.py through the stages).

"Nearest training volume": its training memorises the training masks (the model file holds them on a coarse grid),
and it generates, for a mask, the training volume whose mask is most like it, resampled along the slice axis to the
mask's depth, -1 outside the mask's region. No network: a floor any generator should beat, and an exact copy of a
training volume for every training mask (the privacy table flags them).
"""

from __future__ import annotations

from gem3d.io import InputError
from gem3d.methods.registry import Budget, Method, TestSet, Training

METHOD = Method(
    "nearest", "nearest training volume (toy)", "nearest_method",
    trainings=(Training("nearest", "train_nearest", ("data.labels",), reads="slices", gpu=False),),
    train_set="nearest", test_sets=(TestSet("test_nearest", pin=False),), figure="Nearest training\n(mask only)")
GRID = (8, 16, 16)  # the coarse grid masks are compared on
KIND = "nearest"  # the model file's "kind"


def check(cfg, name: str) -> None:
    """Nothing of its own to check: it reads the slice store only."""


def coarse(label):
    """(d, s, s) labels -> the GRID-shaped int8 tensor masks are compared on."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(label, dtype=torch.float32)[None, None]
    return F.interpolate(x, size=GRID, mode="nearest-exact")[0, 0].to(torch.int8)


def resample_depth(image, depth: int):
    """(d, s, s) float32 -> (depth, s, s), linear along the slice axis."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    return F.interpolate(x, size=(depth, *x.shape[-2:]), mode="trilinear", align_corners=True)[0, 0].numpy()


def train(cfg, name: str, model: str) -> None:
    """Memorise the training masks on the coarse grid (one file, written atomically)."""
    import torch

    from gem3d.data.slice_store import SliceStore
    from gem3d.io import atomic_path
    from gem3d.paths import Paths

    paths = Paths(cfg)
    store = SliceStore(paths.slices)
    cases = store.case_ids("train")
    masks = torch.stack([coarse(store.load(c).label) for c in cases])
    with atomic_path(paths.model(model)) as tmp:
        torch.save({"kind": KIND, "case_ids": cases, "masks": masks}, tmp)


class NearestSampler:
    solver = None  # no diffusion solver

    def __init__(self, cfg):
        import torch

        from gem3d.data.slice_store import SliceStore
        from gem3d.io import file_sha256
        from gem3d.paths import Paths

        path = Paths(cfg).model("nearest")
        sha = file_sha256(path)  # InputError when the file is missing
        memory = torch.load(path, weights_only=True)
        if not isinstance(memory, dict) or memory.get("kind") != KIND:
            raise InputError(f"{path}: not a {KIND} model file (retrain it: gem3d train-method --method nearest)")
        self.case_ids, self.masks = memory["case_ids"], memory["masks"]
        self.store = SliceStore(Paths(cfg).slices)
        self.checkpoints = {"nearest": sha[:16]}

    def nearest(self, label) -> str:
        """The training case whose coarse mask agrees with `label`'s on the most grid points."""
        agreement = (self.masks == coarse(label)[None]).float().mean(dim=(1, 2, 3))
        return self.case_ids[int(agreement.argmax())]

    def generate(self, jobs, pin: bool = True):
        """(d, s, s) images: the nearest training volume of each job's mask; `pin` changes nothing."""
        import numpy as np

        out = []
        for job in jobs:
            image = resample_depth(self.store.load(self.nearest(job.label)).image, job.label.shape[0])
            out.append(np.where(job.label < 0, -1.0, image).astype(np.float32))
        return out


def sampler(cfg, name: str, spec) -> NearestSampler:
    return NearestSampler(cfg)


def budget(cfg, name: str) -> Budget:
    return Budget(0, (), "volumes", f"the slice store's {cfg.preprocess.slice_size}x{cfg.preprocess.slice_size} "
                  "slices", "the nearest training volume resampled along the slice axis to the mask's depth",
                  f"masks compared on a {'x'.join(map(str, GRID))} grid")
