"""`gem3d score`: FID-A/C/S (and paired MS-SSIM / SSIM / PSNR / LPIPS) of any two NIfTI folders.

No config file: the settings come as arguments with the defaults and meanings of the config keys
``evaluation.fid_extractor`` / ``fid_weights`` / ``fid_batch_size`` / ``lpips_net`` /
``lpips_backbone_weights`` / ``lpips_lin_weights``. Both folders go through the same protocol
(gem3d.evaluation.slice_space: Table 1's slice space), and the numbers come from Table 1's and
Table 2's code (quality.volume_moments / fid_between, paired.paired_metrics, quality.fidelity_summary).
docs/evaluation.md describes the protocol and how to read a difference.

Pairs (paired metrics): files with the same name in both folders, or the same key of
``pair_regex`` (its first group, else its whole match, searched in the file name). Without pairs
the paired metrics are "not computed", unless pairs were asked for (``paired`` or ``pair_regex``):
then it is an error. The synthetic file of a pair is taken on its real partner's grid (same voxel
shape and affine required, unless ``ignore_affine``): the real file's crop box and spacing, so the two
are compared voxel by voxel.

Writes ``score.json`` and ``score.md`` into ``out``, atomically. Bad folders are one-line InputErrors.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from gem3d.io import InputError, atomic_path, write_json

log = logging.getLogger("gem3d.evaluation.score")

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SPLIT_GROUPS = 8  # seeded groups of the real volumes for the split-half FID (35 splits of 4 vs 4 groups) ...
MAX_SPLITS = 12  # ... of which this many, drawn with SPLIT_SEED, are scored (each costs a FID)
SPLIT_SEED = 0
AFFINE_TOLERANCE = 1e-3  # largest absolute difference of a pair's affines (mm; data.affine_tolerance's default)
REPEATABILITY = ("FID moves between draws: on the hippocampus CPU run (24 volumes per set, random_conv) three draws "
                 "of one method gave FID-A 0.192, 0.045 and 0.128 (4x), and halves of 48 real hippocampus scans "
                 "0.022 to 0.175; compare differences with the real folder's split-half FID and see "
                 "docs/evaluation.md")
COMPARABILITY = {
    "radimagenet_resnet50": "RadImageNet ResNet-50 (the paper's extractor): comparable to gem3d's Table 1 and to other "
                            "`gem3d score` runs with the same protocol settings and similar sample sizes; not to FIDs "
                            "computed by other code (slice selection, scaling and resizing change FID)",
    "inception_v3": "torchvision's ImageNet Inception-v3, not the TF FID-Inception: NOT comparable to standard "
                    "published FIDs; comparable to other `gem3d score` runs with the same settings",
    "random_conv": "random_conv is weights-free (fixed random features): NOT comparable to any published FID; use it "
                   "to check the command, or to compare runs of this command with the same settings only",
}


# ----------------------------------------------------------------------------- folders and pairs
def nifti_files(folder: Path, option: str) -> list[Path]:
    """The NIfTI files directly in ``folder`` (sorted by name); InputError naming the folder when there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: folder not found ({option})")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder ({option})")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: empty folder ({option}), no NIfTI files to score")
    nifti = [p for p in files if p.name.lower().endswith(NIFTI_SUFFIXES)]
    if not nifti:
        raise InputError(f"{folder}: no NIfTI files (.nii, .nii.gz) among its {len(files)} files, e.g. "
                         f"{files[0].name} ({option})")
    return nifti


def pair_key(name: str, pattern: re.Pattern | None) -> str | None:
    """A file's pairing key: its name, or ``pattern``'s first group (else whole match); None when it does not match."""
    if pattern is None:
        return name
    match = pattern.search(name)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def keyed(files: Sequence[Path], pattern: re.Pattern | None, folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in files:
        key = pair_key(path.name, pattern)
        if key is None:
            continue
        if key in out:
            raise InputError(f"{folder}: {out[key].name} and {path.name} have the same pairing key {key!r} "
                             f"(--pair-regex {pattern.pattern!r})")
        out[key] = path
    return out


def find_pairs(real: Sequence[Path], synthetic: Sequence[Path], pair_regex: str | None, required: bool,
               real_folder: Path, synthetic_folder: Path) -> list[tuple[str, Path, Path]]:
    """``(key, real file, synthetic file)`` of every pair, sorted by key; InputError when ``required`` and none."""
    pattern = None
    if pair_regex is not None:
        try:
            pattern = re.compile(pair_regex)
        except re.error as exc:
            raise InputError(f"--pair-regex {pair_regex!r}: not a regular expression ({exc})") from None
    a, b = keyed(real, pattern, real_folder), keyed(synthetic, pattern, synthetic_folder)
    pairs = [(key, a[key], b[key]) for key in sorted(set(a) & set(b))]
    if required and not pairs:
        how = "no file name is" if pattern is None else f"no key of --pair-regex {pair_regex!r} is"
        raise InputError(f"no pairs: {how} in both {real_folder} and {synthetic_folder} (pairs were asked for)")
    return pairs


def parse_spacing(text: str) -> str | tuple[float, float, float]:
    if text in ("median", "native"):
        return text
    try:
        values = tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InputError(f"--spacing {text!r}: expected median, native or X,Y,Z in mm (e.g. 1,1,1)")
    return values


# ----------------------------------------------------------------------------- scoring
def real_group_moments(scans, space, extractor, batch_size: int, folder: Path):
    """Moments of all real volumes, and of ``SPLIT_GROUPS`` (fewer for small folders, an even number) groups of
    them: volume i goes to group ``rank(i) % groups`` of a seeded permutation (the split-half reference)."""
    from gem3d.evaluation.fid import PLANES
    from gem3d.evaluation.quality import RunningMoments, check_moments, volume_moments
    from gem3d.evaluation.slice_space import read_zyx, to_slice_space

    n_groups = max(2, min(SPLIT_GROUPS, len(scans) // 2 * 2))
    rank = np.argsort(np.random.default_rng(SPLIT_SEED).permutation(len(scans)))
    full = {plane: RunningMoments() for plane in PLANES}
    groups = [{plane: RunningMoments() for plane in PLANES} for _ in range(n_groups)]
    for i, scan in enumerate(scans):
        image, label, _ = to_slice_space(*read_zyx(scan.path), space, scan.path)
        for plane, m in volume_moments(image, label, extractor, batch_size).items():
            full[plane].add(m)
            groups[rank[i] % n_groups][plane].add(m)
        if (i + 1) % 20 == 0 or i + 1 == len(scans):
            log.info("FID features of %s: %d/%d volumes", folder, i + 1, len(scans))
    check_moments(full, f"real folder {folder}")
    sizes = [int(np.sum(rank % n_groups == g)) for g in range(n_groups)]
    return full, groups, sizes


def set_moments(scans, space, extractor, batch_size: int, folder: Path):
    from gem3d.evaluation.quality import plane_moments
    from gem3d.evaluation.slice_space import read_zyx, to_slice_space

    volumes = (to_slice_space(*read_zyx(scan.path), space, scan.path)[:2] for scan in scans)
    moments, _ = plane_moments(volumes, extractor, batch_size, f"synthetic folder {folder}")
    return moments


def split_half_fid(groups, sizes: list[int]) -> dict | str:
    """FID-A/C/S between the two halves of splits of the real groups into two equal numbers of groups (all of
    them, or MAX_SPLITS drawn): the median, minimum and maximum over the splits. Each split is a random halving
    of the real volumes (the groups come from a seeded permutation), so this is what sampling alone gives at half
    the size; the splits share groups, so their range understates the full spread."""
    from itertools import combinations

    from gem3d.evaluation.quality import RunningMoments, fid_between

    if sum(sizes) < 2:
        return "not computed: fewer than 2 real volumes"

    def merged(indices):
        out = {plane: RunningMoments() for plane in groups[0]}
        for i in indices:
            for plane, m in groups[i].items():
                out[plane].add(m)
        return out

    half = len(groups) // 2
    splits = [(0, *c) for c in combinations(range(1, len(groups)), half - 1)]  # group 0 in the first half: no repeats
    if len(splits) > MAX_SPLITS:
        pick = np.random.default_rng(SPLIT_SEED).choice(len(splits), MAX_SPLITS, replace=False)
        splits = [splits[i] for i in sorted(pick)]
    values: dict[str, list[float]] = {"FID-A": [], "FID-C": [], "FID-S": []}
    half_sizes = set()
    for first in splits:
        second = [i for i in range(len(groups)) if i not in first]
        a, b = merged(first), merged(second)
        if min(m.n for h in (a, b) for m in h.values()) < 2:
            continue
        half_sizes |= {sum(sizes[i] for i in first), sum(sizes[i] for i in second)}
        fid = fid_between(a, b)
        for key, plane in (("FID-A", "axial"), ("FID-C", "coronal"), ("FID-S", "sagittal")):
            values[key].append(fid[plane])
    if not values["FID-A"]:
        return "not computed: a half of the real volumes has fewer than 2 non-empty slices in a plane"
    return {"n_splits": len(values["FID-A"]), "n_groups": len(groups),
            "n_volumes_per_half": [min(half_sizes), max(half_sizes)],
            **{key: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))}
               for key, v in values.items()}}


def paired_scores(pairs, space, lpips, lpips_text: str) -> tuple[dict, list[dict]]:
    """Table 2's metrics over the pairs (each synthetic volume on its real partner's grid)."""
    from gem3d.evaluation.paired import paired_metrics
    from gem3d.evaluation.quality import fidelity_summary
    from gem3d.evaluation.slice_space import read_zyx, to_slice_space

    per_pair = []
    for key, real_path, synthetic_path in pairs:
        real, spacing = read_zyx(real_path)
        image, label, box = to_slice_space(real, spacing, space, real_path)
        synthetic, _ = read_zyx(synthetic_path)
        fake, _, _ = to_slice_space(synthetic, spacing, space, synthetic_path, box=box)
        try:
            metrics = paired_metrics(image, fake, mask=label >= 0, lpips=lpips)
        except InputError as exc:
            raise InputError(f"pair {key} ({real_path}, {synthetic_path}): {exc}") from None
        per_pair.append({"key": key, "real": str(real_path), "synthetic": str(synthetic_path), **metrics})
    return fidelity_summary(per_pair, lpips_text), per_pair


def check_pairs_share_grids(pairs, scans, ignore_affine: bool) -> None:
    """Paired metrics compare voxel by voxel: a pair must have one voxel shape and (unless ``ignore_affine``) one
    affine, else a synthetic file stored in another voxel order (an axis flipped) would be compared to the wrong
    voxels."""
    by_path = {s.path: s for s in scans}
    for key, a, b in pairs:
        real, synthetic = by_path[a], by_path[b]
        if real.shape != synthetic.shape:
            raise InputError(f"pair {key}: {a} has shape {tuple(reversed(real.shape))} but {b} has "
                             f"{tuple(reversed(synthetic.shape))}; paired metrics compare the two voxel by voxel on one grid")
        diff = float(np.abs(np.subtract(real.affine, synthetic.affine)).max())
        if not ignore_affine and not diff <= AFFINE_TOLERANCE:  # `not <=`: NaN is a mismatch too
            raise InputError(f"pair {key}: the affine of {b} differs from {a}'s by {diff:.4g} (tolerance "
                             f"{AFFINE_TOLERANCE}), so their voxels are not the same places; save the synthetic "
                             f"volume with its real partner's affine, or pass --ignore-affine if only the header is wrong")


def folder_facts(folder: Path, scans) -> dict:
    return {"folder": str(folder), "n_volumes": len(scans),
            "median_spacing_xyz_mm": [float(v) for v in np.median([s.spacing for s in scans], axis=0)[::-1]],
            "shapes_xyz": sorted({tuple(reversed(s.shape)) for s in scans})[:10]}


def score_folders(real: Path, synthetic: Path, out: Path = Path("."), fid_extractor: str = "radimagenet_resnet50",
                  fid_weights: str | None = None, fid_batch_size: int = 32, lpips_net: str = "alex",
                  lpips_backbone_weights: str | None = None, lpips_lin_weights: str | None = None,
                  spacing: str = "median", slice_size: int | None = None, clip: Sequence[float] | None = None,
                  paired: bool = False, pair_regex: str | None = None, slice_fit: str = "letterbox",
                  intensity: str = "region", ignore_affine: bool = False) -> dict:
    """Score ``synthetic`` against ``real``; write ``out/score.json`` and ``out/score.md``; return the JSON's dict."""
    from gem3d.device import compute_device
    from gem3d.evaluation.extractors import checked_extractor
    from gem3d.evaluation.quality import fid_between, lpips_model_or_reason
    from gem3d.evaluation.slice_space import SliceSpace, survey

    real, synthetic, out = Path(real), Path(synthetic), Path(out)
    real_files, synthetic_files = nifti_files(real, "--real"), nifti_files(synthetic, "--synthetic")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: not a folder (--out)")
    if fid_batch_size < 1:
        raise InputError(f"--fid-batch-size {fid_batch_size}: must be >= 1")
    if slice_size is not None and slice_size < 16:
        raise InputError(f"--slice-size {slice_size}: must be >= 16 (MS-SSIM's smallest slices)")
    how = parse_spacing(spacing)
    pairs = find_pairs(real_files, synthetic_files, pair_regex, paired or pair_regex is not None, real, synthetic)
    device = compute_device()
    extractor, description = checked_extractor(fid_extractor, fid_weights, device, weights_key="--fid-weights",
                                               extractor_key="--fid-extractor", unset="left out")
    lpips, lpips_text = lpips_model_or_reason(lpips_net, lpips_backbone_weights, lpips_lin_weights,
                                              keys=("--lpips-backbone-weights", "--lpips-lin-weights"),
                                              unset="no --lpips-backbone-weights given")
    real_scans = [survey(p) for p in real_files]  # every file read and checked before any feature is computed
    synthetic_scans = [survey(p) for p in synthetic_files]
    check_pairs_share_grids(pairs, real_scans + synthetic_scans, ignore_affine)
    space = SliceSpace.from_real(real_scans, how, slice_size, clip, slice_fit, intensity)
    log.info("scoring %d synthetic against %d real volumes: %s", len(synthetic_scans), len(real_scans), space)

    real_moments, groups, sizes = real_group_moments(real_scans, space, extractor, fid_batch_size, real)
    synthetic_moments = set_moments(synthetic_scans, space, extractor, fid_batch_size, synthetic)
    fid = fid_between(real_moments, synthetic_moments)
    result = {
        "real": folder_facts(real, real_scans),
        "synthetic": folder_facts(synthetic, synthetic_scans),
        "protocol": {**space.describe(), "documentation": "docs/evaluation.md"},
        "fid": {"FID-A": fid["axial"], "FID-C": fid["coronal"], "FID-S": fid["sagittal"],
                "n_slices_real": {p: m.n for p, m in real_moments.items()},
                "n_slices_synthetic": {p: m.n for p, m in synthetic_moments.items()},
                "real_split_half": split_half_fid(groups, sizes),
                "extractor": description, "extractor_name": fid_extractor,
                "weights_free": fid_extractor == "random_conv",
                "note": COMPARABILITY[fid_extractor], "repeatability": REPEATABILITY},
    }
    if pairs:
        summary, per_pair = paired_scores(pairs, space, lpips, lpips_text)
        result["paired"] = {"computed": True, "pairing": "file name" if pair_regex is None else f"--pair-regex "
                            f"{pair_regex!r}", "n_pairs": len(pairs), **summary,
                            "unpaired_real": len(real_files) - len(pairs),
                            "unpaired_synthetic": len(synthetic_files) - len(pairs), "per_pair": per_pair}
    else:
        result["paired"] = {"computed": False, "reason": f"not computed: no file name is in both {real} and {synthetic}"
                            " (pair by name, or give --pair-regex)"}
    write_score(result, out)
    return result


# ----------------------------------------------------------------------------- outputs
def plain_json(value):
    """JSON has no infinity or NaN: such floats become the strings "inf", "-inf", "nan" (PSNR of identical pairs)."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, np.integer):
        return int(value)
    return value


def score_markdown(result: dict) -> str:
    from gem3d.evaluation.tables import markdown_table

    fid, protocol = result["fid"], result["protocol"]
    real, synthetic = result["real"], result["synthetic"]
    split = fid["real_split_half"]
    rows = [{"comparison": f"synthetic ({synthetic['n_volumes']} volumes) vs real ({real['n_volumes']})",
             "FID-A": fid["FID-A"], "FID-C": fid["FID-C"], "FID-S": fid["FID-S"],
             "slices A/C/S (synthetic)": "/".join(str(fid["n_slices_synthetic"][p]) for p in
                                                  ("axial", "coronal", "sagittal"))}]
    if isinstance(split, dict):
        low, high = split["n_volumes_per_half"]
        halves = f"{low} vs {high}" if low == high else f"{low}-{high} volumes per half"
        rows.append({"comparison": f"real split half ({halves}): median [min, max] of {split['n_splits']} "
                                   f"split{'s' if split['n_splits'] > 1 else ''}",
                     **{k: f"{split[k]['median']:.4g} [{split[k]['min']:.4g}, {split[k]['max']:.4g}]"
                        for k in ("FID-A", "FID-C", "FID-S")}, "slices A/C/S (synthetic)": ""})
    else:
        rows.append({"comparison": "real split half", "FID-A": split, "FID-C": "", "FID-S": "",
                     "slices A/C/S (synthetic)": ""})
    spacing = protocol["target_spacing_xyz_mm"]
    notes = [f"Real: {real['folder']} ({real['n_volumes']} volumes); synthetic: {synthetic['folder']} "
             f"({synthetic['n_volumes']} volumes).",
             f"Extractor: {fid['extractor']}. {fid['note']}.",
             "Protocol (docs/evaluation.md): each volume cropped to its non-zero region, resampled to "
             + ("its native grid (no resampling)" if spacing is None else
                "x,y,z " + ", ".join(f"{v:.4g}" for v in spacing) + " mm")
             + f", {protocol['intensity']}"
             + ("" if protocol["clip"] is None else f" after clipping to {protocol['clip']}")
             + f"; axial slices letterboxed to {protocol['slice_size']} x {protocol['slice_size']}; slices without "
               "any voxel of the non-zero region or constant are dropped; FID-A/C/S = axial/coronal/sagittal slices.",
             "Real split half: FID between two random halves of the real volumes (splits of seeded groups), median "
             "[min, max] over the splits: what sampling alone gives at half the real size. A synthetic FID within "
             "that range cannot be told apart from sampling variation (the range understates it: the splits are few "
             "and share groups).",
             REPEATABILITY + "."]
    text = "# gem3d score\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + markdown_table(pd.DataFrame(rows))
    paired = result["paired"]
    text += "\n## Paired metrics\n\n"
    if not paired["computed"]:
        return text + f"{paired['reason']}.\n"
    table = pd.DataFrame([{"pairs": paired["n_pairs"], "MS-SSIM": paired["MS-SSIM"], "SSIM": paired["SSIM"],
                           "PSNR (dB)": paired["PSNR"], "LPIPS": paired["LPIPS"], "slices": paired["n_slices"],
                           "MS-SSIM scales": paired["MS-SSIM scales"]}])
    text += (f"- Pairs by {paired['pairing']}: {paired['n_pairs']} (unpaired: {paired['unpaired_real']} real, "
             f"{paired['unpaired_synthetic']} synthetic); each synthetic volume on its real partner's grid.\n"
             "- Axial slice pairs holding part of the real volume's non-zero region; per pair, then the mean over "
             "pairs. MS-SSIM: Gaussian kernel 11, sigma 1.5, data range 2; PSNR from the MSE pooled over a pair's "
             "slices (inf when identical).\n"
             f"- LPIPS: {paired['LPIPS model']}\n\n")
    return text + markdown_table(table)


def write_score(result: dict, out: Path) -> tuple[Path, Path]:
    """``out/score.json`` and ``out/score.md``, each written atomically."""
    json_path, md_path = Path(out) / "score.json", Path(out) / "score.md"
    write_json(json_path, plain_json(result))
    with atomic_path(md_path) as tmp:
        tmp.write_text(score_markdown(result))
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path
