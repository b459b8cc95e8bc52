"""A toy generation method added the documented way (docs/architecture.md, "Adding a generation method"): this one
file, listed in a config's `method_modules` and its name in `comparisons` (tests/test_dag_smoke.py runs it through
the whole DAG; tests/test_methods.py through the stages).

"Nearest training volume": its training memorises the training masks (the model file holds them on a coarse grid),
and it generates, for a mask, the training volume whose mask is most like it, resampled along the slice axis to the
mask's depth, -1 outside the mask's region. No network: a floor any generator should beat, and an exact copy of a
training volume for every training mask (the privacy table flags them).
"""

from __future__ import annotations

from gem3d.methods.registry import Budget, Method, TestSet, Training

METHOD = Method(
    "nearest", "nearest training volume (toy)", "nearest_method",
    trainings=(Training("nearest", "train_nearest", ("data.labels",), reads="slices", gpu=False),),
    train_set="nearest", test_sets=(TestSet("test_nearest", pin=False),), figure="Nearest training\n(mask only)")
GRID = (8, 16, 16)  # the coarse grid masks are compared on


def check(cfg, name: str) -> None:
    """Nothing of its own to check: it reads the slice store only."""


def _coarse(label):
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(label, dtype=torch.float32)[None, None]
    return F.interpolate(x, size=GRID, mode="nearest-exact")[0, 0].to(torch.int8)


def train(cfg, name: str, model: str) -> None:
    """Memorise the training masks on the coarse grid (one file, written atomically)."""
    import torch

    from gem3d.data.slice_store import SliceStore
    from gem3d.io import atomic_path
    from gem3d.paths import Paths

    paths = Paths(cfg)
    store = SliceStore(paths.slices)
    cases = store.case_ids("train")
    masks = torch.stack([_coarse(store.load(c).label) for c in cases])
    with atomic_path(paths.model(model)) as tmp:
        torch.save({"kind": "nearest", "case_ids": cases, "masks": masks}, tmp)


class NearestSampler:
    solver = None  # no diffusion solver

    def __init__(self, cfg):
        import torch

        from gem3d.data.slice_store import SliceStore
        from gem3d.paths import Paths
        from gem3d.training.checkpoint import sha256_of

        path = Paths(cfg).model("nearest")
        memory = torch.load(path, weights_only=True)
        self.case_ids, self.masks = memory["case_ids"], memory["masks"]
        self.store = SliceStore(Paths(cfg).slices)
        self.checkpoints = {"nearest": sha256_of(path)}

    def generate(self, jobs, pin: bool = True):
        """(d, s, s) images: the nearest training volume of each job's mask (agreement of the coarse masks)."""
        import numpy as np
        import torch

        from gem3d.methods.ldm3d import resample_slices

        out = []
        for job in jobs:
            agreement = (self.masks == _coarse(job.label)[None]).float().mean(dim=(1, 2, 3))
            image = self.store.load(self.case_ids[int(agreement.argmax())]).image
            image = resample_slices(torch.from_numpy(np.asarray(image, np.float32)), job.label.shape[0]).numpy()
            out.append(np.where(job.label < 0, -1.0, image).astype(np.float32))
        return out


def sampler(cfg, name: str, spec) -> NearestSampler:
    return NearestSampler(cfg)


def budget(cfg, name: str) -> Budget:
    return Budget(0, (), "volume", f"the slice store's {cfg.preprocess.slice_size}x{cfg.preprocess.slice_size} "
                  "slices", "the nearest training volume resampled along the slice axis to the mask's depth",
                  f"masks compared on a {'x'.join(map(str, GRID))} grid")
