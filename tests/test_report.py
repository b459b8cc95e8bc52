"""Figures and report tables from a tiny fake run: sets, slice store, checkpoints and tables written here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from gem3d.config import config_from_dict
from gem3d.data.slice_store import letterbox_pad, to_slices
from gem3d.io import InputError, read_json, write_json
from gem3d.paths import Paths
from gem3d.report import FIGURES, TABLES, counterfactual, curves, downstream, figures, informed_fit
from gem3d.report.stages import draw_figure, render_tables
from gem3d.training.checkpoint import save_checkpoint

CASES = [f"fake_{i:03d}" for i in range(6)]
TRAIN, TEST = CASES[:4], CASES[4:]
SHAPE = (14, 15, 12)  # (d, y, x) native, nnU-Net order
SIZE = 16
CFG = {
    "name": "fake", "seed": 0,
    "data": {"format": "brats", "path": "results/fake/phantoms", "modality": "FLAIR",
             "labels": {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing": 3}},
    "phantoms": {"n_cases": 6, "shape": [16, 16, 16], "n_scanners": 2},  # the data note only (16: the schema's least)
    "preprocess": {"slice_size": SIZE},
    "vae": {"model": {"channel_mult": [1, 2]}},  # latents 8x8: the default U-Nets' factor 8 divides them
    "volume_model": {"window": 4},
    "sampling": {"steps": 2},
}
MODELS = ["vae", "slice_model", "volume_stage1", "volume_stage2", "baseline_stage1", "baseline_stage2"]
# image panels (axes with an imshow) per figure for 2 test and 4 training cases
PANELS = {"fig2_comparison": 2 * 4 * 4, "fig3_counterfactual": 4 + 4 * (1 + 1 + 4) - 2,
          "fig4_deenhancement": 1 + 4 * 4, "fig5_overlap_ablation": 2 * 9, "fig6_stage2_ablation": 2 * 8,
          "fig7_samples": 4 * 4 * 2, "training_curves": 0, "informed_fit": 5 * 3, "downstream": 0,
          "segmentation_curves": 0, "adherence": 0}
AXES = {"fig2_comparison": 32, "fig3_counterfactual": 5 * 6, "fig4_deenhancement": 5 + 3 + 4 * 3 + 2,
        "fig5_overlap_ablation": 2 * 10, "fig6_stage2_ablation": 2 * 9, "fig7_samples": 4 * 4 * 2,
        "training_curves": 6, "informed_fit": 5 * 3, "downstream": 3, "segmentation_curves": 8, "adherence": 1}


def fake_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """A head-like (d, y, x) image in [-1, 1] and a label with -1 outside, 0 inside, blobs 1..3."""
    rng = np.random.default_rng(i)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    label = np.where(r < 0.95, 0, -1).astype(np.int8)
    centre = np.array([0.1 * (i % 3) - 0.1, 0.2, -0.1])
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    for lab, rad in ((2, 0.45), (3, 0.3), (1, 0.15)):
        label[(dist < rad) & (label >= 0)] = lab
    gamma = 1.0 + 0.3 * (i % 2)
    head = np.clip(1 - r / 1.2, 0, None) ** gamma * 1.6 - 0.8 + 0.05 * rng.standard_normal(SHAPE)
    image = np.where(label >= 0, head, -1)
    image = np.where(label > 0, 0.6, image)
    return np.clip(image, -1, 1).astype(np.float32), label


def write_set(cfg, name: str, kind: str, cases: list[str], informed=None, noise: float = 0.1) -> None:
    root = Paths(cfg).samples(name)
    (root / "slices").mkdir(parents=True)
    volumes = []
    for i, case in enumerate(cases):
        image, label = fake_case(CASES.index(case))
        sid = f"{case}_{name}"
        img = to_slices(image, SIZE, False) + noise * np.random.default_rng(i).standard_normal((SHAPE[0], SIZE, SIZE))
        np.savez_compressed(root / "slices" / f"{sid}.npz", image=np.clip(img, -1, 1).astype(np.float16),
                            label=to_slices(label, SIZE, True))
        p = 5 + i + (len(name) % 3)  # like the real sets, each set draws its own start slice
        volumes.append({"sample_id": sid, "source_case": case, "copy": 0, "start": p,
                        "informed": informed or {"source": "true", "case": case, "slice": p}, "seed": i})
    write_json(root / "manifest.json", {"set": name, "kind": kind, "volumes": volumes})


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    return make_fake_run(tmp_path, monkeypatch)


def make_fake_run(tmp_path, monkeypatch):
    """results/fake/: slice store, phantoms manifest, every set the figures read, checkpoints, tables."""
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(CFG, source="fake", check_paths=False)
    paths = Paths(cfg)
    paths.slices.mkdir(parents=True)
    index = {"slice_size": SIZE, "labels": CFG["data"]["labels"], "max_label": 3,
             "split": {"train": TRAIN, "test": TEST}, "cases": {}}
    for i, case in enumerate(CASES):
        image, label = fake_case(i)
        np.save(paths.slices / f"{case}_image.npy", to_slices(image, SIZE, False).astype(np.float16))
        np.save(paths.slices / f"{case}_label.npy", to_slices(label, SIZE, True))
        np.save(paths.slices / f"{case}_label_native.npy", label)
        index["cases"][case] = {"preprocessed_shape": list(SHAPE), "letterbox": list(letterbox_pad(*SHAPE[1:])),
                                "spacing_preprocessed": [1.5, 1.0, 1.0]}
    write_json(paths.slices / "index.json", index)
    write_json(paths.phantoms_manifest, {"synthetic": True, "cases": [{"case_id": c, "scanner_id": i % 2}
                                                                      for i, c in enumerate(CASES)]})
    for name in ("test_gem3d", "test_baseline", "test_no_overlap", "test_no_stage2"):
        write_set(cfg, name, "test_true", TEST, noise=0.05 if name == "test_gem3d" else 0.2)
    write_set(cfg, "deenhanced", "deenhance", TRAIN, informed={"source": "fixed", "case": TRAIN[0], "slice": 7})
    for name in cfg.sampling.sets:  # IC, IC_MA, IG, IG_MA: Fig. 7
        write_set(cfg, name, "train_masks", TRAIN, informed={"source": "IC", "case": TRAIN[0], "slice": 5})
    for k, name in enumerate(MODELS):
        save_checkpoint(paths.model(name), {"kind": "unet", "model_args": {}, "state_dict": {}, "step": 30,
                                            "history": {"losses": [[10, 1.0 / (k + 1)], [20, 0.3], [30, 0.1]]}})
    from gem3d.evaluation.tables import write_table

    for t in TABLES:
        write_table(pd.DataFrame({"set": ["IC", "IG"], "FID-A": [12.345678, float("nan")], "n": [3, 4]}),
                    paths.tables / f"{t}.csv", f"Title of {t}", [f"note about {t}"])
    write_downstream(cfg)
    monkeypatch.setattr(counterfactual, "generate", fake_generate)
    return cfg


def write_downstream(cfg) -> None:
    """Downstream metrics of every row (the test cases, a curve per training), Table 4 and the adherence table."""
    from gem3d.evaluation import downstream as rows, stages
    from gem3d.evaluation.tables import write_table

    regions = list(rows.segmentation_regions(cfg))
    for i, data in enumerate(rows.downstream_data(cfg)):
        cases = {c: {"regions": {r: {"dice": 0.6 + 0.05 * i + 0.02 * k, "hd95": 3.0 - 0.1 * i + k, "n_pred": 9,
                                     "n_ref": 9} for r in regions}} for k, c in enumerate(TEST)}
        write_json(rows.metrics_path(cfg, data, 0), {
            "data": data, "seed": 0, "cases": cases, "mean": {r: {} for r in regions}, "n_training_cases": 4,
            "trainer": "T", "configuration": "2d", "fold": "all", "device": "cpu",
            "curve": [{"epoch": e, "pseudo_dice": [0.2 * e] * 3, "mean": 0.2 * e} for e in range(4)]})
    stages.evaluate_segmentation(cfg)
    volumes = pd.DataFrame([{"set": name, "sample_id": f"{c}_{name}", "mean Dice": 0.5 + 0.1 * k}
                            for name in ("IC", "IC_copy1") for k, c in enumerate(TRAIN)])
    write_table(volumes, stages.table_path(cfg, "adherence_volumes"), "adherence", ["note"])


def fake_generate(cfg, jobs):
    """Stand-in for the trained sampler: the mask as grey levels plus a per-job offset."""
    images = [np.where(j.label < 0, -1.0, j.label / 3 - 0.5 + 0.05 * k).astype(np.float32) for k, j in enumerate(jobs)]
    return images, {"vae": "fake", "volume_stage2": "fake"}


@pytest.fixture
def panel_counts(monkeypatch):
    return spy_on_figures(monkeypatch)[0]


def spy_on_figures(monkeypatch):
    """Record (image panels, all axes) of every figure before it is saved, and (the colour maps of its image
    panels, whether it has a legend)."""
    counts, colours = {}, {}
    for module in (figures, counterfactual, curves, informed_fit, downstream):
        original = module.save_figure

        def spy(fig, cfg, name, original=original):
            counts[name] = (sum(bool(ax.get_images()) for ax in fig.axes), len(fig.axes))
            colours[name] = ({tuple(map(tuple, im.get_cmap()(np.linspace(0, 1, 5)).round(3)))
                              for ax in fig.axes for im in ax.get_images()}, bool(fig.legends))
            return original(fig, cfg, name)

        monkeypatch.setattr(module, "save_figure", spy)
    return counts, colours


def check_png_pdf(png, pdf) -> None:
    import matplotlib.image as mpimg

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mpimg.imread(png).shape[0] > 300
    data = pdf.read_bytes()
    assert data[:5] == b"%PDF-" and b"%%EOF" in data[-1024:]


@pytest.fixture(scope="module")
def all_drawn(tmp_path_factory):
    """Every figure drawn once from a fake run (the two tests below read it): (cfg, files written, panel counts,
    colour maps and legends)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        cfg = make_fake_run(tmp_path_factory.mktemp("all_drawn"), monkeypatch)
        counts, colours = spy_on_figures(monkeypatch)
        written = draw_figure(cfg, "all")
        yield cfg, written, counts, colours


def test_every_figure_and_its_panels(all_drawn):
    fake_run, written, panel_counts, _ = all_drawn
    figdir = Paths(fake_run).figures
    assert sorted(written) == sorted(figdir / f"{f}.{e}" for f in FIGURES for e in ("png", "pdf"))
    for name in FIGURES:
        check_png_pdf(figdir / f"{name}.png", figdir / f"{name}.pdf")
        assert panel_counts[name] == (PANELS[name], AXES[name]), name
    assert not list(figdir.glob(".*"))  # no temporary files left
    prov = read_json(figdir / "fig3_counterfactual.json")
    assert prov["mask_case"] == TEST[0] and len(prov["informed"]) == 4
    assert {i["case"] for i in prov["informed"]} <= set(TRAIN) and prov["synthetic_data"] is True


def test_every_mask_has_the_one_colour_map_and_legend(all_drawn):
    """Issue #24.8: the failure-case figure drew masks in viridis, Fig. 2 in the label colours. Every figure draws
    its masks in common.mask_cmap, and a figure with a mask has the label legend."""
    from matplotlib import colormaps

    from gem3d.report.common import mask_cmap

    colours = all_drawn[3]
    samples = lambda cmap: tuple(map(tuple, cmap(np.linspace(0, 1, 5)).round(3)))  # noqa: E731
    masks, grey = samples(mask_cmap(3)[0]), samples(colormaps["gray"])
    with_masks = {name for name, (maps, _) in colours.items() if masks in maps}
    assert {"fig2_comparison", "fig3_counterfactual", "fig6_stage2_ablation", "fig7_samples",
            "informed_fit"} <= with_masks
    for name, (maps, legend) in colours.items():
        assert maps <= {masks, grey}, name
        assert legend or name not in with_masks, name


def test_figures_without_baseline(fake_run, panel_counts, monkeypatch):
    raw = {**CFG, "volume_model": {"window": 4, "baseline": False}}
    cfg = config_from_dict(raw, source="fake", check_paths=False)
    draw_figure(cfg, "fig2_comparison")
    draw_figure(cfg, "training_curves")
    assert panel_counts["fig2_comparison"][0] == 2 * 3 * 4
    assert panel_counts["training_curves"][1] == 4


@pytest.mark.parametrize("name, missing", [("fig2_comparison", "test_baseline"),
                                           ("fig5_overlap_ablation", "test_no_overlap"),
                                           ("fig6_stage2_ablation", "test_no_stage2"),
                                           ("fig4_deenhancement", "deenhanced")])
def test_missing_set_is_an_input_error(fake_run, name, missing):
    import shutil

    shutil.rmtree(Paths(fake_run).samples(missing))
    with pytest.raises(InputError, match=f"sample set {missing} not found"):
        draw_figure(fake_run, name)
    assert not (Paths(fake_run).figures / f"{name}.png").exists()


def test_bad_inputs_name_the_file(fake_run):
    paths = Paths(fake_run)
    paths.model("slice_model").unlink()
    with pytest.raises(InputError, match="slice_model"):
        draw_figure(fake_run, "training_curves")
    save_checkpoint(paths.model("slice_model"), {"kind": "unet", "model_args": {}, "state_dict": {}, "step": 0})
    with pytest.raises(InputError, match="no loss history"):
        draw_figure(fake_run, "training_curves")
    manifest = paths.samples("test_no_stage2") / "manifest.json"
    data = read_json(manifest)
    del data["volumes"][0]["start"]
    write_json(manifest, data)
    with pytest.raises(InputError, match="does not record its start"):
        draw_figure(fake_run, "fig6_stage2_ablation")
    (paths.samples("test_gem3d") / "slices" / f"{TEST[0]}_test_gem3d.npz").unlink()
    with pytest.raises(InputError, match="not found"):
        draw_figure(fake_run, "fig2_comparison")


def test_cli_reports_a_missing_set(fake_run, capsys):
    import shutil

    from gem3d.cli import main

    (fake_run_cfg := Paths(fake_run).root / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    shutil.rmtree(Paths(fake_run).samples("test_no_overlap"))
    assert main(["figure", "--name", "fig5_overlap_ablation", "--config", str(fake_run_cfg)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "test_no_overlap" in errors[0] and "not found" in errors[0]


def test_tables_render_to_html(fake_run):
    render_tables(fake_run, None)
    page = (Paths(fake_run).root / "report" / "tables" / "segmentation.html").read_text()
    assert "Downstream segmentation on the real test split" in page and "bootstrap interval" in page
    for t in TABLES:
        if t == "segmentation":  # Table 4 from the downstream metrics (write_downstream), above
            continue
        page = (Paths(fake_run).root / "report" / "tables" / f"{t}.html").read_text()
        assert f"<h2>Title of {t}</h2>" in page and f"note about {t}" in page
        assert "12.35" in page and "n/a" in page and "SYNTHETIC" in page
        assert '<td class="num">' in page
    (Paths(fake_run).tables / "privacy.csv").unlink()
    with pytest.raises(InputError, match="privacy.csv: table not found"):
        render_tables(fake_run, ["privacy"])


@pytest.mark.parametrize("synthetic", [True, False])
def test_every_caption_renders(synthetic):
    """Each report() output of report.smk has a caption file that renders (Jinja2 then reStructuredText) like
    Snakemake renders it, naming synthetic data only for the demo."""
    import re
    from types import SimpleNamespace

    from docutils.core import publish_parts
    from jinja2 import Environment

    from conftest import REPO

    rules = (REPO / "workflow" / "rules" / "report.smk").read_text()
    captions = set(re.findall(r'caption=f?"\.\./report/([^"]+)"', rules))
    expected = {"{_fig}.rst", "fig3_counterfactual.rst", "table_{t}.rst"}
    assert captions == expected
    files = [f"{f}.rst" for f in FIGURES] + [f"table_{t}.rst" for t in TABLES] + ["workflow.rst"]
    env = Environment(trim_blocks=True, lstrip_blocks=True)
    config = {"phantoms": {"n_cases": 12}} if synthetic else {}
    snakemake = SimpleNamespace(params=SimpleNamespace(synthetic=synthetic), config=config)
    for name in files:
        text = env.from_string((REPO / "workflow" / "report" / name).read_text()).render(snakemake=snakemake)
        body = publish_parts(text, writer="html", settings_overrides={"report_level": 2})["body"]
        assert "SYNTHETIC" in body if synthetic else "SYNTHETIC" not in body, name
        assert "System Message" not in body and len(body) > 200, name


@pytest.mark.slow
def test_snakemake_report_with_every_caption(fake_run, tmp_path):
    """report.smk's rules run the figure and table commands; `snakemake --report` embeds them with captions."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    (tmp_path / "Snakefile").write_text(f'''
import os
from gem3d import resources as RESOURCES
from gem3d.config import load_config
from gem3d.fingerprint import config_digest
from gem3d.paths import Paths
from gem3d.sampling import sets as SETS
configfile: "cfg.yaml"
CONFIG_FILE = "cfg.yaml"
os.environ.update(GEM3D_CONFIG_FILE=CONFIG_FILE)
CFG = load_config(CONFIG_FILE, check_paths=False)
P = Paths(CFG)
report: "{REPO}/workflow/report/workflow.rst"
include: "{REPO}/workflow/rules/common.smk"
include: "{REPO}/workflow/rules/report.smk"
KEEP = ("fig2_comparison", "training_curves", "tables")  # two figure rules (each job imports torch) + tables
rule all:
    input: [t for t in REPORT_TARGETS if any(k in str(t) for k in KEEP)]
''')
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    run = [str(bindir / "snakemake"), "-s", "Snakefile", "--cores", "2"]
    res = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(run + ["--report", "report.html"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    page = (tmp_path / "report.html").read_text()
    assert "This run uses SYNTHETIC demo data" in page  # workflow description, rendered with the config
    for name in ["fig2_comparison", "training_curves"] + list(TABLES):
        assert f"{name}." in page, name
    for marker in ("Fig. 2 (b) of the paper", "Training curves.", "Table 1 of the paper", "Table 2 of the paper",
                   "Table 4 of the paper", "Privacy summary.", "Privacy baseline."):
        assert marker in page, marker
    for log in ("figure_fig2_comparison", "render_tables"):
        assert (tmp_path / "results" / "fake" / "logs" / f"{log}.log").is_file()
        assert (tmp_path / "results" / "fake" / "benchmarks" / f"{log}.tsv").is_file()


def test_a_long_title_wraps_to_the_figure_width():
    """The downstream figure's title ran off both sides of the figure; titles wrap, and the data note follows."""
    import matplotlib.pyplot as plt

    from gem3d.report.common import TITLE_CHARS_PER_INCH, figure_title

    cfg = config_from_dict(CFG, source="fake", check_paths=False)
    fig = plt.figure(figsize=(4, 3))
    title = "word " * 40
    figure_title(fig, cfg, title)
    lines = fig._suptitle.get_text().strip("\n").split("\n")
    assert len(lines) >= 4 and max(map(len, lines)) <= 4 * TITLE_CHARS_PER_INCH
    note = fig.texts[-1].get_text()
    assert note.startswith("\n" * len(lines)) and "run 'fake'" in note
    plt.close(fig)


def test_fig3_moves_the_tumour_in_mm_and_the_vae_panel_names_its_loss_terms():
    """Found in review: Fig. 3's edited mask rotated in voxel units (the IC_MA sets rotate in mm), and the training
    curves called the VAE's loss "L1 + KL" whatever its LPIPS and adversarial weights."""
    from conftest import tiny_raw

    cfg = config_from_dict(tiny_raw(), source="tiny", check_paths=False)
    native = np.zeros((8, 16, 16), np.int16)
    native[2:6, 4:12, 4:12], native[3:5, 6:9, 6:9] = 2, 3
    _, params = counterfactual.counterfactual_mask(cfg, native, seed=0, spacing=(3.0, 1.0, 1.0))
    assert "in mm (spacing [3.0, 1.0, 1.0])" in params["rotation_order"]
    assert curves.vae_terms(cfg) == "L1 + KL"
    weighted = config_from_dict(tiny_raw(**{"vae.perceptual_weight": 1.0, "vae.perceptual_vgg_weights": "vgg16.pth",
                                                "vae.adversarial": {"weight": 0.5, "start": 5, "layers": 2}}),
                                source="tiny", check_paths=False)
    assert curves.vae_terms(weighted) == "L1 + KL + LPIPS + adversarial"
