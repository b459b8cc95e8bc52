"""Evaluation stages: sample sets -> the paper's tables (one typed function per `gem3d <stage>`).

    evaluate-generation    Table 1: FID-A/C/S of every train_masks set vs the real training volumes
    evaluate-fidelity      Table 2: MS-SSIM / LPIPS / PSNR / SSIM of the test sets vs the real test cases, and
                           Table 3 (injection.csv) when `comparisons` trains an injection variant
    prepare-segmentation   Table 4, one training data: its nnU-Net dataset, preprocessed with the real row's plans
    train-segmentation     Table 4, one training data and seed: nnU-Net on it, predictions + metrics of the real test split
    evaluate-adherence     the real-data nnU-Net's Dice of every generated volume against its own mask
    evaluate-segmentation  Table 4: Dice / HD95 per region with intervals, seed spread and paired differences
    evaluate-privacy       nearest training volume of every generated volume; flagged near copies
    score                  FID-A/C/S (+ paired metrics) of any two NIfTI folders, without a config (score.py)

Tables go to ``Paths.tables`` as CSV + Markdown (tables.py); each names its extractor / model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from gem3d.commands import Arg, Command
from gem3d.config import Config, EvaluationConfig, PreprocessConfig
from gem3d.data.slice_store import FITS, INTENSITIES
from gem3d.io import InputError, read_json
from gem3d.methods import registry
from gem3d.paths import Paths

log = logging.getLogger("gem3d.evaluation.stages")

TABLES = {
    "generation": "generation_quality.csv",
    "fidelity": "test_fidelity.csv",
    "injection": "injection.csv",
    "segmentation": "segmentation.csv",
    "segmentation_cases": "segmentation_cases.csv",
    "adherence": "adherence.csv",
    "adherence_volumes": "adherence_volumes.csv",
    "privacy": "privacy.csv",
    "privacy_training": "privacy_training_nn.csv",
    "privacy_summary": "privacy_summary.csv",
}


def table_path(cfg: Config, key: str) -> Path:
    return Paths(cfg).tables / TABLES[key]


def _store(cfg: Config):
    from gem3d.data.slice_store import SliceStore

    return SliceStore(Paths(cfg).slices)


def _open_sets(cfg: Config, names: list[str], kind: str, store) -> list:
    """Open every set and read its first volume, so a missing set or a wrong geometry fails before any work."""
    from gem3d.sampling.sets import SampleSet

    sets = [SampleSet.open(cfg, name, kind) for name in names]
    for sample_set in sets:
        sample_set.load(sample_set.volumes[0], store.slice_size)
    return sets


def load_extractor(cfg: Config):
    """``(module, description)`` of ``evaluation.fid_extractor``; weights only from the configured local file."""
    from gem3d.evaluation.extractors import checked_extractor
    from gem3d.device import compute_device as device

    ev = cfg.evaluation
    return checked_extractor(ev.fid_extractor, ev.fid_weights, device(),
                             weights_key=f"{cfg.source}: evaluation.fid_weights")


def evaluate_generation(cfg: Config) -> None:
    """FID-A/FID-C/FID-S of "baseline" and every sampling set against the real training volumes."""
    from gem3d.evaluation.quality import generation_quality
    from gem3d.sampling.sets import TRAIN_MASKS, generation_sets
    from gem3d.evaluation.tables import write_table

    extractor, description = load_extractor(cfg)
    store = _store(cfg)
    sets = _open_sets(cfg, generation_sets(cfg), TRAIN_MASKS, store)
    df = generation_quality(store, sets, extractor, description, cfg.evaluation.fid_batch_size)
    notes = [f"Extractor: {description}",
             f"Real: the {df['n_real_volumes'].iloc[0]} training volumes of the slice store; generated: one volume per "
             "training mask. Slices in slice space (s x s axial), without any voxel of nnU-Net's non-zero region or "
             "constant, are dropped; FID-A/C/S = axial/coronal/sagittal slices.",
             "Frechet distance in float64 from the mean and unbiased covariance of the extractor features."]
    if cfg.evaluation.fid_extractor != "radimagenet_resnet50":
        notes.append(f"{cfg.evaluation.fid_extractor} is not the paper's RadImageNet ResNet-50: "
                     "these numbers are not comparable to the paper's.")
    notes += _no_informed_notes(cfg, generation_sets(cfg)) + budget_notes(cfg, generation_sets(cfg))
    write_table(df, table_path(cfg, "generation"), "Generation quality of the training-mask sets (Table 1)", notes)
    log.info("wrote %s", table_path(cfg, "generation"))


def evaluate_fidelity(cfg: Config) -> None:
    """Paired MS-SSIM, LPIPS, PSNR, SSIM of every test set against the real test cases (axial slice pairs)."""
    from gem3d.evaluation.paired import MS_SSIM_BETAS
    from gem3d.evaluation.quality import fidelity_table, lpips_or_reason
    from gem3d.sampling.sets import TEST_TRUE, injection_sets, test_sets
    from gem3d.evaluation.tables import write_table

    store = _store(cfg)
    sets = _open_sets(cfg, test_sets(cfg), TEST_TRUE, store)
    lpips, lpips_text = lpips_or_reason(cfg.evaluation)
    df = fidelity_table(store, sets, lpips, lpips_text)
    scales = ", ".join(sorted(set(df["MS-SSIM scales"])))
    notes = ["Real: the test case in slice space; generated: the same case from its test mask with its true informed "
             "slice. Axial slice pairs holding part of the real case's non-zero region; per volume, then the mean "
             "over the n volumes.",
             f"MS-SSIM: Gaussian kernel 11, sigma 1.5, data range 2; scales used: {scales} "
             f"(standard betas {MS_SSIM_BETAS} truncated and renormalised to fit the slice size).",
             f"LPIPS: {lpips_text}", "PSNR (dB) from the MSE pooled over a volume's slices, data range 2 ([-1, 1])."]
    notes += _no_informed_notes(cfg, test_sets(cfg))
    ms_ssim = df.set_index("method")["MS-SSIM"]
    enabled = {m.name: m.test_sets[0].name for m in registry.enabled(cfg) if m.test_sets}
    order = {enabled[n]: ms_ssim[enabled[n]] for n in PAPER_TABLE2_ORDER if enabled.get(n) in ms_ssim.index}
    write_table(df, table_path(cfg, "fidelity"), "Fidelity on the test split (Table 2)",
                notes + paper_order_note("The paper's order of Table 2 (GEM-3D > 3D LDM > 3D Pix2Pix)", order)
                + budget_notes(cfg, test_sets(cfg)))
    log.info("wrote %s", table_path(cfg, "fidelity"))
    rows = injection_sets(cfg)
    if rows:
        by_set = df.set_index("method")
        table = pd.DataFrame([{"injection": row, "set": name, **by_set.loc[name].to_dict()} for row, name in rows.items()])
        write_table(table, table_path(cfg, "injection"), "Feature injection of the conditions (Table 3)", [
            "The volume model with the mask and the informed slice injected by concatenation (GEM-3D), by a "
            "ControlNet-style control branch (both branches trained) or by cross-attention to the informed slice's "
            "embedding (the mask concatenated); same training, stages and sampling; rows of the test fidelity table.",
            *notes[:1], *paper_best_note("The paper's finding of Table 3 (concatenation best)", "concatenation",
                                         {row: ms_ssim[name] for row, name in rows.items()}),
            *budget_notes(cfg, list(rows.values()))])
        log.info("wrote %s", table_path(cfg, "injection"))


PAPER_TABLE2_ORDER = ("gem3d", "ldm3d", "pix2pix")  # the paper's Table 2 by fidelity: GEM-3D > 3D LDM > 3D Pix2Pix


def _ranked(values: dict[str, float]) -> str:
    return " > ".join(f"{k} {v:.4f}" for k, v in sorted(values.items(), key=lambda kv: -kv[1]))


def paper_order_note(claim: str, values: dict[str, float]) -> list[str]:
    """Whether MS-SSIM `values` (row -> value, listed in the paper's order, best first) fall in that order here;
    [] with fewer than two rows (issue #23: the table says when the paper's order does not hold)."""
    if len(values) < 2:
        return []
    items = list(values.values())
    return _verdict(claim, all(a > b for a, b in zip(items, items[1:])), values)


def paper_best_note(claim: str, best: str, values: dict[str, float]) -> list[str]:
    """Whether row `best` has the highest MS-SSIM of `values` (row -> value); [] without it or a rival."""
    if best not in values or len(values) < 2:
        return []
    return _verdict(claim, all(values[best] > v for row, v in values.items() if row != best), values)


def _verdict(claim: str, holds: bool, values: dict[str, float]) -> list[str]:
    """The note's one sentence: the paper's claim, whether it holds here, and the MS-SSIM values judged."""
    return [f"{claim}: {'holds' if holds else 'does not hold'} here (MS-SSIM: {_ranked(values)})."]


def _no_informed_notes(cfg: Config, names: list[str]) -> list[str]:
    """The note that the methods without an informed slice cannot decouple the conditions (the paper's D.C.)."""
    from gem3d.sampling.sets import method_of

    without = [name for name in names if (method_of(cfg, name) or registry.get("gem3d")).informed is False]
    if not without:
        return []
    return [f"{', '.join(without)}: mask only, no informed slice; these methods cannot decouple the conditions "
            "(the paper's D.C. column: no)."]


CROSSATTN_NOTE = ("Cross-attention: the paper attends to a CLIP image embedding of the informed slice; gem3d's row "
                  "{how}.")


def adherent_row_sets(cfg: Config) -> list[str]:
    """The sets of the adherent downstream row (the ones min_adherence filters)."""
    from gem3d.sampling.sets import downstream_rows

    return [name for spec in downstream_rows(cfg).values() if spec.adherent for name in spec.sets]


def budget_notes(cfg: Config, names: list[str]) -> list[str]:
    """Every method's budget among the sets `names` (issue #23): parameters, optimizer steps x batch, what the
    network sees and how the data are resampled, beside GEM-3D's (the ratios)."""
    from gem3d.sampling.sets import method_of

    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault((method_of(cfg, name) or registry.get("gem3d")).name, []).append(name)
    reference = registry.budget(cfg, "gem3d")
    notes = []
    for method, sets in groups.items():
        b = registry.budget(cfg, method)
        ratio = "" if method == "gem3d" else f" ({b.ratios(reference)})"
        notes.append(f"Budget of {registry.get(method).label} ({', '.join(sets)}): {b.text()}{ratio}.")
    if "crossattn" in groups:
        encoder = cfg.volume_model.crossattn_encoder
        how = (f"attends to the pooled embedding of a frozen {encoder['extractor']} (volume_model.crossattn_encoder)"
               if encoder else "attends to the tokens of a spatial tokenizer of the informed latent trained with the "
               "network (more information than one CLIP vector; volume_model.crossattn_encoder gives a frozen encoder)")
        notes.append(CROSSATTN_NOTE.format(how=how))
    return notes


def prepare_segmentation(cfg: Config, data: str) -> None:
    """nnU-Net raw dataset and preprocessing of one training data (the real row plans; the others use its plans)."""
    from gem3d.evaluation.downstream import prepare_row

    prepare_row(cfg, data)


def train_segmentation(cfg: Config, data: str, seed: int = 0) -> None:
    """nnU-Net v2 trained on one training data with one seed; predicts and scores the real test split."""
    from gem3d.evaluation.downstream import run_downstream

    run_downstream(cfg, data, seed)


def evaluate_adherence(cfg: Config) -> None:
    """Mask adherence of every generated volume of the downstream sets (the real-data nnU-Net's Dice)."""
    from gem3d.evaluation.adherence import measure
    from gem3d.evaluation.tables import write_table

    summary, volumes = measure(cfg)
    threshold = cfg.evaluation.segmentation.min_adherence
    note = ("Adherence: the Dice of the real-data nnU-Net's segmentation of a generated volume (the downstream row "
            "'real', seed 0, trained on real scans only) against the mask the volume was generated from, per region "
            "and their mean. " + (f"'below threshold': volumes under evaluation.segmentation.min_adherence "
                                  f"{threshold:g}; those of the adherent row's sets "
                                  f"({', '.join(adherent_row_sets(cfg))}) are left out of it (its metrics.json "
                                  "lists them), the other sets' are counted only." if threshold is not None else
                                  "No min_adherence is set: no volume is left out of any row."))
    write_table(summary, table_path(cfg, "adherence"), "Mask adherence of the generated sets", [note])
    write_table(volumes, table_path(cfg, "adherence_volumes"), "Mask adherence of every generated volume", [note])
    log.info("wrote %s", table_path(cfg, "adherence"))


def segmentation_long(cfg: Config, names: list[str]) -> tuple[pd.DataFrame, list[dict]]:
    """One line per (row, seed, test case, region) of every row's trainings, and the trainings' records."""
    from gem3d.evaluation.downstream import metrics_path, seeds, segmentation_regions
    from gem3d.evaluation.statistics import long_lines

    regions = list(segmentation_regions(cfg))
    parts, records = [], []
    for name in names:
        for seed in seeds(cfg):
            path = metrics_path(cfg, name, seed)
            if not path.is_file():
                raise InputError(f"{path}: segmentation metrics of {name} seed {seed} not found (run `gem3d "
                                 f"train-segmentation --data {name} --seed {seed}` first)")
            record = read_json(path)
            if sorted(record["mean"]) != sorted(regions):
                raise InputError(f"{path}: regions {sorted(record['mean'])} differ from this config's {regions}")
            cases = {case: value["regions"] for case, value in record["cases"].items()}
            parts.append(long_lines(name, seed, cases))
            records.append(record)
    return pd.concat(parts, ignore_index=True), records


def _hd95_both(records: list[dict]) -> pd.DataFrame:
    """Per row and region: the mean HD95 over the (seed, case) pairs where both masks are non-empty."""
    lines = [{"row": r["data"], "region": region, "hd95": m["hd95"]}
             for r in records for case in r["cases"].values() for region, m in case["regions"].items()
             if m["n_pred"] > 0 and m["n_ref"] > 0]
    if not lines:
        return pd.DataFrame(columns=["row", "region", "hd95_both_mean", "hd95_both_n"])
    df = pd.DataFrame(lines).groupby(["row", "region"], sort=False)["hd95"]
    return pd.DataFrame({"hd95_both_mean": df.mean(), "hd95_both_n": df.size()}).reset_index()


def evaluate_segmentation(cfg: Config, data: list[str] | None = None) -> None:
    """Table 4: per row and region, Dice and HD95 with bootstrap intervals over the real test cases (seeds pooled
    per case), the spread over seeds and the paired difference to the real row; per-case values beside it."""
    from gem3d.evaluation.downstream import CONVENTIONS, downstream_data, row, segmentation_regions
    from gem3d.evaluation.statistics import summarise, summary_notes, write_long_csv, write_summary

    names = list(data) if data else downstream_data(cfg)
    long_df, records = segmentation_long(cfg, names)
    write_long_csv(long_df, table_path(cfg, "segmentation_cases"))
    reference = "real" if "real" in names else None
    summary = summarise(long_df, reference_row=reference)
    summary = summary.merge(_hd95_both(records), on=["row", "region"], how="left")
    first = {r["data"]: r for r in records}
    summary.insert(1, "label", [row(cfg, name).label for name in summary["row"]])
    summary["n_training_cases"] = [first[name]["n_training_cases"] for name in summary["row"]]
    seg = cfg.evaluation.segmentation
    regions = segmentation_regions(cfg)
    one = records[0]
    notes = summary_notes(summary, reference) + [
        "Rows: the data nnU-Net v2 was trained on (generated sets: generated images with their masks only; 'real +': "
        "the real training cases and the generated ones). Test: the real test split, predicted at its original "
        f"geometry. nnU-Net: {one['trainer']} {one['configuration']} fold {one['fold']}, {seg.epochs} epochs x "
        f"{seg.iterations_per_epoch} iterations, {seg.seeds} seed(s) per row, {one['device']}; every row is "
        "preprocessed with the real row's nnU-Net plans.",
        "Regions: " + ", ".join(f"{r} = labels {v}" for r, v in regions.items()) + ".",
        CONVENTIONS + " hd95_both_mean: the mean HD95 over the (seed, case) pairs where both masks are non-empty, "
        "comparable with published tables that leave such cases out."]
    write_summary(summary, table_path(cfg, "segmentation"), "Downstream segmentation on the real test split "
                  "(Table 4)", notes, reference)
    log.info("wrote %s", table_path(cfg, "segmentation"))


def evaluate_privacy(cfg: Config) -> None:
    """Nearest training volume of every generated volume vs the training nearest-neighbour baseline."""
    from gem3d.evaluation.quality import PRIVACY_GRID, privacy_summary, privacy_tables
    from gem3d.sampling.sets import TRAIN_MASKS, privacy_sets
    from gem3d.evaluation.tables import write_table

    store = _store(cfg)
    sets = _open_sets(cfg, privacy_sets(cfg), TRAIN_MASKS, store)
    q = cfg.evaluation.privacy_quantile
    generated, baseline = privacy_tables(store, sets, q)
    summary = privacy_summary(generated, baseline)
    threshold = float(generated["threshold_pearson"].iloc[0])
    method = (f"Similarity: Pearson correlation of the slice-space image volumes resampled to {PRIVACY_GRID} "
              "(d, h, w); the nearest training volume has the highest correlation; mse: mean squared difference to it.")
    rule = (f"Near copy: Pearson above {threshold:.4f}, the {q:g} quantile of the training volumes' correlations to "
            "their nearest OTHER training volume (about 1 - q of new real subjects would be flagged too: candidates "
            "to inspect).")
    write_table(generated, table_path(cfg, "privacy"), "Privacy: nearest training volume of each generated volume",
                [method, rule, "nearest_is_source: the nearest training volume is the one whose mask was used."])
    write_table(baseline, table_path(cfg, "privacy_training"),
                "Privacy baseline: nearest other training volume of each training volume", [method])
    write_table(summary, table_path(cfg, "privacy_summary"), "Privacy summary", [method, rule])
    log.info("wrote %s (%d generated volumes, %d near copies)", table_path(cfg, "privacy"), len(generated),
             int(generated["near_copy"].sum()))


def score(real: Path, synthetic: Path, out: Path, fid_extractor: str, fid_weights: str | None, fid_batch_size: int,
          lpips_net: str, lpips_backbone_weights: str | None, lpips_lin_weights: str | None, spacing: str,
          slice_size: int | None, clip: list[float] | None, paired: bool, pair_regex: str | None, slice_fit: str,
          intensity: str, ignore_affine: bool) -> None:
    """`gem3d score`: gem3d.evaluation.score.score_folders (no config)."""
    from gem3d.evaluation.score import score_folders

    score_folders(real, synthetic, out, fid_extractor, fid_weights, fid_batch_size, lpips_net, lpips_backbone_weights,
                  lpips_lin_weights, spacing, slice_size, clip, paired, pair_regex, slice_fit, intensity,
                  ignore_affine)


EV, PREPROCESS = EvaluationConfig(), PreprocessConfig()  # `gem3d score`'s defaults are the config keys' defaults
SCORE_ARGS = (
    Arg(("--real",), dict(required=True, type=Path, dest="real", metavar="DIR",
                          help="folder of real NIfTI volumes (.nii/.nii.gz directly in it)")),
    Arg(("--synthetic",), dict(required=True, type=Path, dest="synthetic", metavar="DIR",
                               help="folder of synthetic NIfTI volumes")),
    Arg(("--out",), dict(type=Path, default=Path("."), dest="out", metavar="DIR",
                         help="where score.json and score.md go (default: the current directory)")),
    Arg(("--fid-extractor",), dict(default=EV.fid_extractor, dest="fid_extractor",
                                   choices=("radimagenet_resnet50", "inception_v3", "random_conv"),
                                   help="FID features, as evaluation.fid_extractor (default %(default)s; "
                                        "random_conv is weights-free and NOT comparable to published FID)")),
    Arg(("--fid-weights",), dict(default=EV.fid_weights, dest="fid_weights", metavar="FILE",
                                 help="the extractor's local weights file, as evaluation.fid_weights "
                                      "(radimagenet_resnet50: RadImageNet-ResNet50_notop.pth of torch hub "
                                      "Warvito/radimagenet-models)")),
    Arg(("--fid-batch-size",), dict(type=int, default=EV.fid_batch_size, dest="fid_batch_size", metavar="N",
                                    help="slices per feature batch (default %(default)s)")),
    Arg(("--lpips-net",), dict(default=EV.lpips_net, choices=("alex", "vgg"), dest="lpips_net",
                               help="LPIPS backbone, as evaluation.lpips_net (default %(default)s)")),
    Arg(("--lpips-backbone-weights",), dict(default=EV.lpips_backbone_weights, dest="lpips_backbone_weights",
                                            metavar="FILE", help="torchvision AlexNet/VGG-16 weights file, as "
                                            "evaluation.lpips_backbone_weights; without it LPIPS is not computed")),
    Arg(("--lpips-lin-weights",), dict(default=EV.lpips_lin_weights, dest="lpips_lin_weights", metavar="FILE",
                                       help="LPIPS linear heads (default: the file bundled with torchmetrics)")),
    Arg(("--spacing",), dict(default="median", dest="spacing", metavar="median|native|X,Y,Z",
                             help="resample every volume to nnU-Net's target spacing of the real folder (median, the "
                                  "default), not at all (native: voxel grids as stored), or to X,Y,Z mm")),
    Arg(("--slice-size",), dict(type=int, default=None, dest="slice_size", metavar="S",
                                help="axial slices letterboxed to S x S (Table 1's preprocess.slice_size; default: the "
                                     "median longer in-plane side of the real volumes' non-zero region)")),
    Arg(("--slice-fit",), dict(default=PREPROCESS.slice_fit, choices=FITS, dest="slice_fit",
                               help="how a slice becomes square, as preprocess.slice_fit (default %(default)s; "
                                    "stretch: as the authors' data loader and config/brats_release.yaml)")),
    Arg(("--intensity",), dict(default=PREPROCESS.intensity, choices=INTENSITIES, dest="intensity",
                               help="min-max to [-1, 1] over the non-zero region (-1 outside) or the whole crop, as "
                                    "preprocess.intensity (default %(default)s)")),
    Arg(("--clip",), dict(type=float, nargs=2, default=None, dest="clip", metavar=("LO", "HI"),
                          help="clip intensities to [LO, HI] first, in both folders (CT: nnU-Net's 0.5/99.5 "
                               "foreground percentiles, e.g. -1000 1000)")),
    Arg(("--paired",), dict(action="store_true", dest="paired",
                            help="require pairs (same file name in both folders) for MS-SSIM/SSIM/PSNR/LPIPS; without "
                                 "it, pairs are scored when there are any")),
    Arg(("--pair-regex",), dict(default=None, dest="pair_regex", metavar="REGEX",
                                help="pair files by this regex's first group (else its match) in the file names, "
                                     "e.g. '^(.+?)(_0000)?\\.nii' (implies --paired)")),
    Arg(("--ignore-affine",), dict(action="store_true", dest="ignore_affine",
                                   help="compare pairs voxel by voxel even where their affines differ (synthetic files "
                                        "saved without their real partner's affine); without it such a pair is refused")),
)

COMMANDS = {
    "evaluate-generation": Command(
        evaluate_generation, "Table 1: FID-A/C/S of the baseline and every sampling set vs the real training volumes"),
    "evaluate-fidelity": Command(
        evaluate_fidelity, "Table 2: MS-SSIM, LPIPS, PSNR, SSIM of the test sets vs the real test cases"),
    "prepare-segmentation": Command(
        prepare_segmentation, "Table 4, one row: its nnU-Net raw dataset and preprocessing (the real row plans; the "
        "others are preprocessed with its plans)",
        args=(Arg(("--data",), dict(required=True, dest="data", metavar="NAME",
                                    help="real | enhanced_<k>x | baseline | real_enhanced_<k>x | "
                                         "enhanced_<k>x_adherent (the rows of this config)")),)),
    "train-segmentation": Command(
        train_segmentation, "Table 4, one row and seed: train nnU-Net v2 on its data, predict and score the real test "
        "split",
        args=(Arg(("--data",), dict(required=True, dest="data", metavar="NAME",
                                    help="a row of this config (see prepare-segmentation)")),
              Arg(("--seed",), dict(type=int, default=0, dest="seed",
                                    help="0 .. evaluation.segmentation.seeds - 1 (default 0)")))),
    "evaluate-adherence": Command(
        evaluate_adherence, "mask adherence: the real-data nnU-Net's Dice of every generated volume of the downstream "
        "sets against its own mask"),
    "evaluate-segmentation": Command(
        evaluate_segmentation, "Table 4: Dice and HD95 with bootstrap intervals, seed spread and paired differences "
        "to real, for every row",
        args=(Arg(("--data",), dict(nargs="+", default=None, dest="data", metavar="NAME",
                                    help="only these training data (default: all of this config)")),)),
    "evaluate-privacy": Command(
        evaluate_privacy, "nearest training volume of every generated volume; flag near copies"),
    "score": Command(
        score, "FID-A/C/S (and MS-SSIM/SSIM/PSNR/LPIPS of pairs) of a synthetic NIfTI folder against a real one, "
        "with Table 1's protocol; no config needed; writes score.json + score.md", args=SCORE_ARGS,
        needs_config=False),
}
