"""What every figure shares: reading sets and real cases, views with true aspect, mask colours, saving.

Volumes are (d, s, s) arrays in the slice store's slice space: axis 0 is the slice (axial) axis,
each slice letterboxed to a square and resized to s x s. The physical size of a pixel comes from
the case's geometry (nnU-Net spacing, letterbox), so coronal and sagittal views are drawn with
their true aspect ratio, superior (high slice index) up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402

from gem3d.config import Config  # noqa: E402
from gem3d.io import InputError, atomic_path, read_json  # noqa: E402
from gem3d.paths import Paths  # noqa: E402
from gem3d.sampling.sets import SampleSet  # noqa: E402

SYNTHETIC_NOTE = "SYNTHETIC demo data: computer-generated phantoms, not patients"
DPI = 150
LABEL_COLOURS = ["#d62728", "#2ca02c", "#ffdd00", "#1f77b4", "#9467bd", "#ff7f0e", "#17becf", "#e377c2"]


TITLE_CHARS_PER_INCH = 12  # bold 11 pt characters that fit one inch of a figure's width


def data_note(cfg: Config) -> str:
    """One line naming the run and, for the demo, that its data are synthetic."""
    if cfg.phantoms is not None:
        return f"{SYNTHETIC_NOTE} (run '{cfg.name}')"
    return f"dataset: {cfg.data.format} at {cfg.data.path} (run '{cfg.name}')"


def figure_title(fig, cfg: Config, title: str, y: float = 0.995) -> None:
    """Bold title, wrapped to the figure's width (TITLE_CHARS_PER_INCH), then the data note in red when the data
    are synthetic."""
    import textwrap

    colour = "#b00000" if cfg.phantoms is not None else "0.3"
    lines = textwrap.wrap(title, width=max(30, int(fig.get_figwidth() * TITLE_CHARS_PER_INCH)))
    fig.suptitle("\n".join(lines) + "\n", fontsize=11, fontweight="bold", y=y, va="top")
    fig.text(0.5, y - 0.005, "\n" * len(lines) + data_note(cfg), ha="center", va="top", fontsize=8.5, color=colour)


def save_figure(fig, cfg: Config, name: str) -> list[Path]:
    """Write figures/<name>.png and .pdf atomically; close the figure."""
    out = Paths(cfg).figures
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format=ext, metadata=None if ext == "png" else {"Title": name})
        paths.append(path)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- data


@dataclass
class Case:
    """One volume in slice space with the geometry of its source case."""

    case_id: str
    image: np.ndarray  # (d, s, s) float32 in [-1, 1]
    label: np.ndarray  # (d, s, s) int8, -1 outside the non-zero region
    geometry: dict


class Store:
    """The real data (slice store) of a run, checked once."""

    def __init__(self, cfg: Config):
        from gem3d.data.slice_store import SliceStore

        index = Paths(cfg).slices / "index.json"
        if not index.is_file():
            raise InputError(f"{index}: slice store not found (run `gem3d build-slices` first)")
        self.store = SliceStore(index.parent)
        self.max_label = self.store.max_label
        self.labels = {int(v): k for k, v in self.store.index["labels"].items()}

    def case_ids(self, part: str | None = None) -> list[str]:
        return self.store.case_ids(part)

    def load(self, case_id: str) -> Case:
        c = self.store.load(case_id)
        return Case(case_id, np.asarray(c.image, np.float32), np.asarray(c.label), c.geometry)


def open_set(cfg: Config, name: str, kind: str | None = None) -> SampleSet:
    """A generated set (one-line InputError when missing or malformed)."""
    return SampleSet.open(cfg, name, kind)


def common_cases(sets: list[SampleSet], store: Store, part: str, limit: int) -> list[str]:
    """Cases of the split part present in every set (sorted), at most `limit`."""
    ids = [c for c in store.case_ids(part) if all(c in s.by_case() for s in sets)]
    if not ids:
        names = ", ".join(s.name for s in sets)
        raise InputError(f"sample sets {names} share no {part} case with the slice store "
                         f"{store.store.root} (generated for another run?)")
    return ids[:limit]


def scanner_ids(cfg: Config) -> dict[str, int]:
    """Case -> simulated scanner id from the phantoms manifest (demo data); {} for real data."""
    if cfg.phantoms is None:
        return {}
    path = Paths(cfg).phantoms_manifest
    if not path.is_file():
        return {}
    cases = read_json(path).get("cases", [])
    return {c["case_id"]: int(c["scanner_id"]) for c in cases if "case_id" in c and "scanner_id" in c}


# ----------------------------------------------------------------------------- geometry and views


def pixel_sizes(geometry: dict, slice_size: int) -> tuple[float, float, float]:
    """(slice spacing, row pixel size, column pixel size) in mm of the slice-space arrays."""
    spacing = [float(v) for v in geometry.get("spacing_preprocessed", (1.0, 1.0, 1.0))]
    d, h, w = geometry["preprocessed_shape"]
    top, bottom, left, right = geometry["letterbox"]  # all 0 when the slices were stretched
    return spacing[0], spacing[1] * (h + top + bottom) / slice_size, spacing[2] * (w + left + right) / slice_size


def centre_of(label: np.ndarray) -> tuple[int, int, int]:
    """(z, y, x) centroid of the structures (label > 0), else of the non-zero region, else the middle."""
    for sel in (label > 0, label >= 0):
        if sel.any():
            return tuple(int(round(v)) for v in np.argwhere(sel).mean(axis=0))
    return tuple(s // 2 for s in label.shape)


def axial_pair(label: np.ndarray, avoid: int | None = None) -> tuple[int, int]:
    """Two axial slices: the one with the largest structure area, and one ~30% of the region from the other end,
    not within 1 slice of `avoid` (the informed slice p, which GEM-3D is given)."""
    area = (label > 0).sum(axis=(1, 2))
    inside = np.flatnonzero((label >= 0).any(axis=(1, 2)))
    z0, z1 = (int(inside[0]), int(inside[-1])) if inside.size else (0, label.shape[0] - 1)
    a = int(np.argmax(area)) if area.any() else (z0 + z1) // 2
    b = z0 + round(0.3 * (z1 - z0)) if a > (z0 + z1) / 2 else z0 + round(0.7 * (z1 - z0))
    if avoid is not None and abs(b - avoid) < 2:  # not the informed slice itself: step 3 slices away from a
        b = int(np.clip(b + (3 if b > a else -3), z0, z1))
    return a, int(b)


@dataclass(frozen=True)
class View:
    plane: str  # axial | coronal | sagittal
    index: int
    aspect: float  # pixel height / width for imshow

    def take(self, vol: np.ndarray) -> np.ndarray:
        if self.plane == "axial":
            return vol[self.index]
        if self.plane == "coronal":
            return vol[:, self.index, :]
        return vol[:, :, self.index]

    @property
    def origin(self) -> str:
        return "upper" if self.plane == "axial" else "lower"  # slice axis: superior up

    def short(self) -> str:
        return {"axial": "ax", "coronal": "cor", "sagittal": "sag"}[self.plane] + f" {self.index}"


def views_for(case: Case, axial: tuple[int, ...], point: tuple[int, int, int] | None = None) -> list[View]:
    """Axial views at `axial`, then coronal and sagittal through `point` (default: structure centroid)."""
    dz, dy, dx = pixel_sizes(case.geometry, case.image.shape[1])
    _, y, x = centre_of(case.label) if point is None else point
    return ([View("axial", int(k), dy / dx) for k in axial]
            + [View("coronal", int(y), dz / dx), View("sagittal", int(x), dz / dy)])


def mask_cmap(max_label: int) -> tuple[ListedColormap, BoundaryNorm]:
    """-1 outside (black), 0 inside (grey), 1..K distinct colours."""
    colours = ["black", "#555555"] + [LABEL_COLOURS[(k - 1) % len(LABEL_COLOURS)] for k in range(1, max_label + 1)]
    bounds = np.arange(-1.5, max_label + 1.0, 1.0)
    return ListedColormap(colours), BoundaryNorm(bounds, len(colours))


def show(ax, arr: np.ndarray, view: View, mask: bool = False, max_label: int = 1) -> None:
    """Draw one slice; images share the fixed grey range [-1, 1] (no per-panel rescaling)."""
    if mask:
        cmap, norm = mask_cmap(max_label)
        ax.imshow(arr, cmap=cmap, norm=norm, interpolation="nearest", aspect=view.aspect, origin=view.origin)
    else:
        ax.imshow(arr, cmap="gray", vmin=-1, vmax=1, interpolation="nearest", aspect=view.aspect,
                  origin=view.origin)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)


def label_legend(fig, labels: dict[int, str], max_label: int, y: float = 0.005) -> None:
    """A one-line colour legend of the mask labels at the bottom of the figure."""
    from matplotlib.patches import Patch

    cmap, _ = mask_cmap(max_label)
    handles = [Patch(color=cmap.colors[0], label="outside region (-1)")]
    handles += [Patch(color=cmap.colors[k + 1], label=f"{labels.get(k, k)} ({k})") for k in range(0, max_label + 1)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, y))


def consecutive_difference(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(d - 1,) mean |slice k+1 - slice k| over the non-zero region of both slices (NaN if empty)."""
    inside = label >= 0
    both = inside[1:] & inside[:-1]
    diff = np.abs(image[1:] - image[:-1])
    count = both.sum(axis=(1, 2))
    total = np.where(both, diff, 0).sum(axis=(1, 2))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def pick_by_scanner(cases: list[str], scanners: dict[str, int], n: int) -> list[str]:
    """Round-robin over scanners (sorted), so every scanner shows up; order: by scanner then case."""
    groups: dict[int, list[str]] = {}
    for c in cases:
        groups.setdefault(scanners.get(c, -1), []).append(c)
    picked = []
    while len(picked) < min(n, len(cases)):
        for sid in sorted(groups):
            if groups[sid] and len(picked) < n:
                picked.append(groups[sid].pop(0))
    return sorted(picked, key=lambda c: (scanners.get(c, -1), c))


def tag(ax, text: str) -> None:
    ax.text(0.03, 0.97, text, transform=ax.transAxes, color="white", fontsize=6, va="top", ha="left",
            bbox=dict(boxstyle="square,pad=0.1", fc="black", ec="none", alpha=0.5))
