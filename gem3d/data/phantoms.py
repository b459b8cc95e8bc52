"""Synthetic demo data: deterministic FLAIR-like head volumes with tumour masks, in BraTS layout.

Nothing here is real patient data; every file and folder is named ``synthetic_*``. The output goes
through the same importer as real BraTS 2017-2021 data::

    out_dir/phantoms.json                         parameters (seed, scanners, per-case anatomy), file hashes
    out_dir/synthetic_NNN/synthetic_NNN_flair.nii.gz   float32 image, 0 outside the head
    out_dir/synthetic_NNN/synthetic_NNN_seg.nii.gz     uint8 labels (see `phantom_labels`)

``ct_phantom`` makes a CT-like test volume of its own (an elliptic body of a given size in Hounsfield
units, lungs, one organ, a table, air around), for the informed-slice fit guard's body outlines.

Arrays are (x, y, z): x left-right (the midline is the plane x = centre), y anterior-posterior,
z inferior-superior (axial slice axis last). The affine is BraTS-like (diag(-sx, -sy, sz)) with
the volume centre at world (0, 0, 0). Case i depends only on (seed, i), not on n_cases.
Unlike real BraTS (skull-stripped), the synthetic heads keep a scalp and skull rim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from gem3d.io import InputError, Volume, atomic_dir, file_sha256, write_json, write_volume

LABEL_SCHEMES = ("2017", "2013")

# Base FLAIR-like tissue intensities (arbitrary units, before the scanner model).
_TISSUE = {
    "scalp": 0.65, "skull": 0.06, "csf": 0.08, "grey": 0.52, "white": 0.42, "ventricle": 0.06,
    "oedema": 0.95, "enhancing": 0.78, "non_enhancing": 0.85, "necrosis": 0.35,
}


def phantom_labels(label_scheme: str = "2017") -> dict[str, int]:
    """Label name -> value. 2017: {0, 1 NCR/NET core, 2 oedema, 4 enhancing}; 2013: {0..4}."""
    if label_scheme == "2017":
        return {"background": 0, "necrotic_non_enhancing_core": 1, "oedema": 2, "enhancing": 4}
    if label_scheme == "2013":
        return {"background": 0, "necrosis": 1, "oedema": 2, "non_enhancing": 3, "enhancing": 4}
    raise ValueError(f"label_scheme={label_scheme!r}; allowed: {', '.join(LABEL_SCHEMES)}")


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """BraTS-like orientation (x and y flipped), volume centre at world origin."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _scanner_params(seed: int, scanner_id: int) -> dict:
    rng = np.random.default_rng([seed, 0, scanner_id])
    return {
        "scanner_id": scanner_id,
        "gamma": float(rng.uniform(0.8, 1.25)),  # contrast curve
        "scale": float(rng.uniform(400.0, 1200.0)),
        "offset": float(rng.uniform(5.0, 40.0)),  # > 0: the head is strictly non-zero
        "noise_sigma": float(rng.uniform(0.01, 0.035)),  # Rician, relative to the base scale
        "bias_strength": float(rng.uniform(0.05, 0.25)),
    }


def _smooth_dir(rng: np.random.Generator, amp: float) -> np.ndarray:
    """Coefficients of a smooth function of direction (degree <= 2 in the unit vector)."""
    return rng.uniform(-amp, amp, size=9)


def _eval_dir(coef: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Evaluate `_smooth_dir` coefficients on unit vectors n (3, ...)."""
    x, y, z = n
    terms = (x, y, z, x * y, y * z, x * z, x * x - y * y, 2 * z * z - x * x - y * y, x * y * z)
    return sum(c * t for c, t in zip(coef, terms))


def _unit(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.sqrt((p**2).sum(axis=0))
    return r, p / np.maximum(r, 1e-6)


def _anatomy(rng: np.random.Generator, shape, spacing):
    """Tissue-class volume for one subject; returns (classes dict of bool masks, params, coords)."""
    shape_a = np.asarray(shape, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64)
    extent = shape_a * sp
    grid = np.indices(shape, dtype=np.float64)  # (3, x, y, z)
    mm = (grid - ((shape_a - 1) / 2)[:, None, None, None]) * sp[:, None, None, None]

    # Smooth random warp of the whole subject (low-frequency sinusoids, mm).
    warp_amp = rng.uniform(0.005, 0.02, size=3) * extent
    warp_k = rng.uniform(0.5, 1.5, size=(3, 3)) * 2 * np.pi / extent[None, :]
    warp_phase = rng.uniform(0, 2 * np.pi, size=3)
    p = mm.copy()
    for a in range(3):
        p[a] += warp_amp[a] * np.sin(np.tensordot(warp_k[a], mm, axes=1) + warp_phase[a])

    semi = np.array([0.38, 0.42, 0.38]) * rng.uniform(0.95, 1.02, size=3) * extent
    u = p / semi[:, None, None, None]  # normalised head coordinates
    rho, n = _unit(u)
    head = rho < 1.0
    brain_coef = _smooth_dir(rng, 0.03)
    brain_r = 0.80 * (1 + _eval_dir(brain_coef, n))
    brain = rho < brain_r
    rb = rho / brain_r  # 0 at centre, 1 at the brain surface

    gyri_f = rng.uniform(6.0, 9.0, size=3)
    gyri_ph = rng.uniform(0, 2 * np.pi, size=3)
    gyri = np.prod([np.sin(gyri_f[a] * u[a] + gyri_ph[a]) for a in range(3)], axis=0)
    cortex_t = float(rng.uniform(0.78, 0.84))
    grey = brain & (rb > cortex_t + 0.06 * gyri)
    sulci = brain & (rb > 0.9) & (gyri < -0.6)

    vent_scale = float(rng.uniform(0.8, 1.3))
    vent_c = np.array([0.11, rng.uniform(0.0, 0.08), rng.uniform(0.03, 0.12)])
    vent_semi = np.array([0.07, 0.28, 0.12]) * vent_scale
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        c = vent_c * np.array([side, 1.0, 1.0])
        q = (u - c[:, None, None, None]) / vent_semi[:, None, None, None]
        ventricles |= (q**2).sum(axis=0) < 1.0
    falx = brain & (np.abs(p[0]) < 0.6 * sp[0]) & (rb > 0.45) & (u[2] > -0.1)

    classes = {
        "scalp": head & (rho >= 0.92),
        "skull": head & (rho >= 0.84) & (rho < 0.92),
        "csf": head & (rho < 0.84) & ~brain,
        "white": brain,
    }
    classes["grey"] = grey
    classes["csf"] = classes["csf"] | sulci | falx
    classes["ventricle"] = ventricles & brain
    params = {
        "head_semi_axes_mm": semi.tolist(), "warp_amplitude_mm": warp_amp.tolist(),
        "brain_shape_coef": brain_coef.tolist(), "cortex_threshold": cortex_t,
        "gyri_frequency": gyri_f.tolist(), "ventricle_scale": vent_scale,
        "ventricle_centre_norm": vent_c.tolist(),
    }
    return head, brain, classes, params, p, semi


def _tumour(rng: np.random.Generator, brain: np.ndarray, p: np.ndarray, semi: np.ndarray, spacing):
    """BraTS-style nested tumour (2013 labels 1..4) inside `brain`; retried until all labels exist."""
    r_brain = 0.8 * float(semi.mean())
    min_vox = 3
    for attempt in range(50):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        t = rng.uniform(0.25, 0.5)
        centre = t * 0.8 * semi * d  # mm in the warped frame
        r_oed = rng.uniform(0.35, 0.48) * r_brain
        r_core = rng.uniform(0.5, 0.65) * r_oed
        r_nec = rng.uniform(0.35, 0.5) * r_core
        r_nec = max(r_nec, 1.2 * max(spacing))
        oed_coef, core_coef = _smooth_dir(rng, 0.2), _smooth_dir(rng, 0.1)
        ne_dir = rng.normal(size=3)
        ne_dir /= np.linalg.norm(ne_dir)
        r, n = _unit(p - centre[:, None, None, None])
        oedema = (r < r_oed * (1 + _eval_dir(oed_coef, n))) & brain
        core_r = r_core * (1 + _eval_dir(core_coef, n))
        core = r < core_r
        necrosis = r < r_nec * (1 + 0.5 * _eval_dir(core_coef, n))
        rim = core & ~necrosis
        non_enh = rim & (np.tensordot(ne_dir, n, axes=1) > 0.55)
        lab = np.zeros(brain.shape, dtype=np.uint8)
        lab[oedema] = 2
        lab[rim] = 4
        lab[non_enh] = 3
        lab[necrosis] = 1
        counts = np.bincount(lab.ravel(), minlength=5)
        core_inside = not np.any(core & ~brain)
        if core_inside and np.all(counts[1:] >= min_vox):
            params = {
                "centre_mm_warped": centre.tolist(), "radial_fraction": float(t),
                "radius_oedema_mm": float(r_oed), "radius_core_mm": float(r_core),
                "radius_necrosis_mm": float(r_nec), "non_enhancing_direction": ne_dir.tolist(),
                "attempts": attempt + 1,
            }
            return lab, params
    raise ValueError(f"shape too small to place a tumour with all sub-regions (brain {brain.sum()} voxels)")


def _bias(rng: np.random.Generator, shape, strength: float) -> tuple[np.ndarray, list]:
    g = np.indices(shape, dtype=np.float64)
    u = (g / (np.asarray(shape, dtype=np.float64) - 1)[:, None, None, None]) * 2 - 1
    coef = rng.normal(size=6)
    coef /= np.abs(coef).sum()
    field = coef[0] * u[0] + coef[1] * u[1] + coef[2] * u[2]
    field = field + coef[3] * u[0] * u[1] + coef[4] * u[1] * u[2] + coef[5] * (u[2] ** 2 - 0.33)
    return np.exp(strength * field), coef.tolist()


def synthesise_case(seed: int, index: int, shape, spacing, scanner: dict, label_scheme: str = "2017"):
    """One synthetic case: (flair float32, seg uint8, params). Deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, 1, index])
    head, brain, classes, anat, p, semi = _anatomy(rng, shape, spacing)
    lab2013, tum = _tumour(rng, brain, p, semi, spacing)

    jitter = {k: float(rng.uniform(0.93, 1.07)) for k in _TISSUE}
    tissue = np.zeros(shape, dtype=np.float64)
    for name in ("scalp", "skull", "white", "grey", "csf", "ventricle"):
        tissue[classes[name]] = _TISSUE[name] * jitter[name]
    for value, name in ((2, "oedema"), (4, "enhancing"), (3, "non_enhancing"), (1, "necrosis")):
        tissue[lab2013 == value] = _TISSUE[name] * jitter[name]
    tissue = ndimage.gaussian_filter(tissue, sigma=0.5, mode="constant")  # partial volume

    bias, bias_coef = _bias(rng, shape, scanner["bias_strength"])
    img = (tissue ** scanner["gamma"]) * bias
    s = scanner["noise_sigma"]
    img = np.sqrt((img + rng.normal(0, s, shape)) ** 2 + rng.normal(0, s, shape) ** 2)  # Rician
    img = scanner["offset"] + scanner["scale"] * img
    img[~head] = 0.0  # background exactly 0 (crop-to-nonzero)

    seg = lab2013.copy()
    if label_scheme == "2017":
        seg[seg == 3] = 1  # NCR/NET merged, as in BraTS 2017-2021
    labels = phantom_labels(label_scheme)
    params = {
        "anatomy": anat, "tumour": tum, "tissue_jitter": jitter, "bias_coef": bias_coef,
        "label_voxels": {k: int((seg == v).sum()) for k, v in labels.items()},
    }
    return img.astype(np.float32), seg.astype(np.uint8), params


def generate_phantoms(
    out_dir: str | Path,
    n_cases: int = 12,
    shape: tuple[int, int, int] = (48, 48, 40),
    n_scanners: int = 3,
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    label_scheme: str = "2017",
) -> list[str]:
    """Write `n_cases` synthetic cases in BraTS layout to `out_dir` (atomically, as a whole).

    `out_dir` is owned by the generator: an existing one is replaced only if it holds a
    previous `phantoms.json` (or is empty). Case i gets scanner i % n_scanners.
    """
    out_dir = Path(out_dir)
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if label_scheme not in LABEL_SCHEMES:
        raise ValueError(f"label_scheme={label_scheme!r}; allowed: {', '.join(LABEL_SCHEMES)}")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape={shape}; need 3 sizes, each >= 16")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={spacing}; need 3 positive values")
    if n_cases < 1 or n_scanners < 1:
        raise ValueError(f"n_cases={n_cases}, n_scanners={n_scanners}; both must be >= 1")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "phantoms.json").exists():
        raise InputError(f"{out_dir}: exists, is not empty and has no phantoms.json; refusing to replace it")

    scanners = [_scanner_params(seed, s) for s in range(n_scanners)]
    affine = phantom_affine(shape, spacing)
    cases, ids = [], []
    with atomic_dir(out_dir) as tmp:
        for i in range(n_cases):
            case_id = f"synthetic_{i:03d}"
            scanner = scanners[i % n_scanners]
            img, seg, params = synthesise_case(seed, i, shape, spacing, scanner, label_scheme)
            case_dir = tmp / case_id
            write_volume(case_dir / f"{case_id}_flair.nii.gz", Volume(img, affine), dtype=np.float32)
            write_volume(case_dir / f"{case_id}_seg.nii.gz", Volume(seg, affine), dtype=np.uint8)
            cases.append({
                "case_id": case_id, "scanner_id": scanner["scanner_id"],
                "flair": f"{case_id}/{case_id}_flair.nii.gz", "seg": f"{case_id}/{case_id}_seg.nii.gz",
                **params,
            })
            ids.append(case_id)
        # the content of every file written: the import's data digest leaves out what still matches it
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / "phantoms.json", {
            "generator": "gem3d.data.phantoms", "synthetic": True,
            "note": "synthetic phantoms, not patient data",
            "seed": seed, "n_cases": n_cases, "shape": list(shape), "spacing": list(spacing),
            "n_scanners": n_scanners, "label_scheme": label_scheme, "labels": phantom_labels(label_scheme),
            "affine": affine.tolist(), "axes": "x left-right, y anterior-posterior, z inferior-superior",
            "scanners": scanners, "cases": cases, "files": files,
        })
    return ids


def ct_phantom(scale: float, shape: tuple[int, int, int] = (40, 40, 12),
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU image int16, mask uint8, body bool), arrays (x, y, z) of a CT-like phantom: an elliptic body of in-plane
    radii scale x (0.4, 0.3) of the first side (soft tissue, about 40 HU), lungs (-850 HU) in its upper 40 % of
    slices, an organ (label 1, 60 HU) in its lower half, a table (150 HU) below it across a gap of air, air
    (-1000 HU) around. `body` is the outline a body detector should find: the ellipse, lungs included."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    side, depth = float(shape[0]), shape[2]
    cx, cy, rx, ry = (shape[0] - 1) / 2, 0.425 * shape[1], 0.4 * side * scale, 0.3 * side * scale
    body = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    hu = np.where(body, 40 + 10 * rng.standard_normal(shape), -1000 + 5 * rng.standard_normal(shape))
    lungs = (np.minimum(np.abs(x - cx - 0.375 * rx), np.abs(x - cx + 0.375 * rx)) / (0.25 * rx)) ** 2 \
        + ((y - cy) / (0.5 * ry)) ** 2 < 1
    hu[lungs & (z >= round(0.6 * depth))] = -850
    organ = (((x - cx + 0.25 * rx) / (0.3 * rx)) ** 2 + ((y - cy) / (0.33 * ry)) ** 2 < 1) & (z < depth // 2)
    hu[organ] = 60
    table = int(round(0.85 * shape[1]))
    hu[:, table: table + 2, :] = 150
    return hu.astype(np.int16), organ.astype(np.uint8), body
