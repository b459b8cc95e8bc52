"""Evaluation metrics: extractor loading (locally created weight files), FID, paired metrics,
LPIPS, Dice/HD95 and the privacy check. Small arrays only; no network access needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from gem3d.evaluation import (
    BRATS_REGIONS,
    build_extractor,
    dice,
    fid_from_features,
    fid_per_plane,
    fid_per_plane_detailed,
    flag_near_copies,
    frechet_distance,
    hd95,
    label_regions,
    load_lpips,
    ms_ssim_scales,
    nearest_training,
    paired_metrics,
    plane_slices,
    region_metrics,
    training_nn_baseline,
)
from gem3d.evaluation.extractors import KerasResNet50
from gem3d.evaluation.fid import letterbox, volume_plane_features
from gem3d.evaluation.paired import default_lpips_lin_path
from gem3d.evaluation.segmentation_metrics import EMPTY_HD95_MM
from gem3d.io import InputError

torch.set_num_threads(2)


def smooth_volume(rng: np.random.Generator, shape=(12, 20, 16), sigma=2.0) -> np.ndarray:
    v = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (0.9 * v / np.abs(v).max()).astype(np.float32)


# ----------------------------------------------------------------------------- extractors
@pytest.fixture(scope="module")
def tv_resnet50_state():
    from torchvision.models import resnet50

    torch.manual_seed(0)
    return resnet50(weights=None).state_dict()


@pytest.fixture(scope="module")
def keras_resnet50_state():
    torch.manual_seed(1)
    return KerasResNet50().state_dict()


def _sequential(state):  # BMEII-AI layout: nn.Sequential(*children[:-1]) under "backbone."
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    return {f"backbone.{index[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in state.items() if not k.startswith("fc.")}


LAYOUTS = {
    "plain": lambda s: s,
    "state_dict_wrapper": lambda s: {"state_dict": s, "epoch": 3},
    "module_prefix": lambda s: {f"module.{k}": v for k, v in s.items()},
    "model_wrapper_backbone_prefix": lambda s: {"model": {f"backbone.{k}": v for k, v in s.items()}},
    "bmeii_sequential": _sequential,
    "unknown_prefix": lambda s: {f"net_g.trunk.{k}": v for k, v in s.items()},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_radimagenet_torchvision_layouts_load(tmp_path, tv_resnet50_state, layout):
    path = tmp_path / "w.pth"
    torch.save(LAYOUTS[layout](tv_resnet50_state), path)
    model, desc = build_extractor("radimagenet_resnet50", path)
    path.unlink()
    assert str(path) in desc and "sha256" in desc and "radimagenet_resnet50" in desc
    loaded = model.trunk.state_dict()
    for key in ("conv1.weight", "layer3.2.conv2.weight", "layer4.0.downsample.1.running_var"):
        assert torch.equal(loaded[key], tv_resnet50_state[key])
    assert model.num_features == 2048


def test_radimagenet_keras_hub_layout_and_features(tmp_path, keras_resnet50_state):
    path = tmp_path / "RadImageNet-ResNet50_notop.pth"
    torch.save(keras_resnet50_state, path)
    model, desc = build_extractor("radimagenet_resnet50", path)
    assert "keras-hub" in desc
    assert isinstance(model.trunk, KerasResNet50)
    for key in ("conv1.bias", "layer2.0.conv1.weight", "layer2.0.downsample.0.bias"):
        assert torch.equal(model.trunk.state_dict()[key], keras_resnet50_state[key])
    # features = spatial mean of the trunk on [0,1] input minus the BGR mean, resized to 224
    x = torch.rand(2, 1, 48, 40) * 2 - 1
    with torch.no_grad():
        feats = model(x)
        ref_in = torch.nn.functional.interpolate((x + 1) / 2, size=(224, 224), mode="bilinear", antialias=False)
        ref_in = ref_in.repeat(1, 3, 1, 1) - torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1)
        ref = model.trunk(ref_in).mean(dim=(2, 3))
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(feats, ref)
    # the Keras block strides in its first 1x1 conv
    assert model.trunk.layer2[0].conv1.stride == (2, 2) and model.trunk.layer2[0].conv2.stride == (1, 1)


def test_extractor_missing_and_wrong_files(tmp_path):
    from torchvision.models import resnet18

    missing = tmp_path / "nope.pth"
    with pytest.raises(InputError, match=f"weights missing at {missing}"):
        build_extractor("radimagenet_resnet50", missing)
    with pytest.raises(InputError, match="weights missing"):
        build_extractor("inception_v3", None)
    wrong = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(InputError, match=rf"{wrong}: .*(missing|shape)") as info:
        build_extractor("radimagenet_resnet50", wrong)
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(InputError, match=f"{garbage}: radimagenet_resnet50 weights is not a torch or safetensors"):
        build_extractor("radimagenet_resnet50", garbage)
    with pytest.raises(ValueError, match="radimagenet_resnet50, inception_v3, random_conv"):
        build_extractor("vgg_fid")


def test_inception_v3_loads_torchvision_checkpoint(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    path = tmp_path / "inception_v3_google.pth"
    torch.save(state, path)
    model, desc = build_extractor("inception_v3", path)
    path.unlink()
    assert "inception_v3" in desc and "not the TF FID-Inception" in desc
    assert torch.equal(model.net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32) * 2 - 1).shape == (2, 2048)


def test_random_conv_is_deterministic():
    a, desc = build_extractor("random_conv")
    b, _ = build_extractor("random_conv")
    assert "not comparable" in desc
    x = torch.rand(4, 1, 30, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert a(x).shape == (4, a.num_features)
    with pytest.raises(ValueError):
        build_extractor("random_conv", "/some/file.pth")


# ----------------------------------------------------------------------------- FID
def test_plane_slices_shapes_empty_and_mask():
    rng = np.random.default_rng(0)
    vol = rng.uniform(-1, 1, size=(5, 6, 7)).astype(np.float32)
    assert plane_slices(vol, "axial").shape == (5, 1, 6, 7)
    assert plane_slices(vol, "coronal").shape == (6, 1, 5, 7)
    assert plane_slices(vol, "sagittal").shape == (7, 1, 5, 6)
    np.testing.assert_array_equal(plane_slices(vol, "coronal")[2, 0], vol[:, 2, :])
    vol[0] = -1.0  # constant (background) axial slice
    assert plane_slices(vol, "axial").shape[0] == 4
    assert plane_slices(vol, "axial", drop_empty=False).shape[0] == 5
    mask = np.zeros(vol.shape, bool)
    mask[2:4, 1:3, 1:3] = True
    assert plane_slices(vol, "axial", mask=mask).shape[0] == 2
    assert plane_slices(vol, "sagittal", mask=mask).shape[0] == 2
    assert plane_slices(vol, "coronal", size=16).shape == (6, 1, 16, 16)
    with pytest.raises(ValueError, match="plane"):
        plane_slices(vol, "oblique")


def test_letterbox_keeps_aspect_ratio():
    x = torch.ones(1, 1, 4, 8)
    out = letterbox(x)  # pad to 8x8 with -1 rows top and bottom
    assert out.shape == (1, 1, 8, 8)
    assert torch.all(out[0, 0, :2] == -1) and torch.all(out[0, 0, 2:6] == 1) and torch.all(out[0, 0, 6:] == -1)
    assert letterbox(x, 16).shape == (1, 1, 16, 16)


def test_frechet_distance_matches_sqrtm_formula():
    import scipy.linalg

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 6)), rng.standard_normal((50, 6)) * 1.5 + 0.3
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert abs(fid_from_features(a, a)) < 1e-9


def test_fid_per_plane_self_vs_shifted_and_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(2)
    real = [smooth_volume(rng) for _ in range(3)]
    other = [smooth_volume(rng, shape=(14, 18, 22), sigma=0.7) * 0.5 + 0.3 for _ in range(3)]  # other geometry
    extractor, _ = build_extractor("random_conv")
    same = fid_per_plane(real, real, extractor, batch_size=16)
    assert set(same) == {"axial", "coronal", "sagittal"}
    diff = fid_per_plane_detailed(real, other, extractor, batch_size=16)
    for plane in same:
        assert abs(same[plane]) < 1e-6
        assert diff[plane].fid > 1e-3 and diff[plane].fid > 1000 * abs(same[plane])
    assert diff["axial"].n_real == 36 and diff["axial"].n_generated == 42
    assert diff["coronal"].n_real == 60 and diff["sagittal"].n_generated == 66

    # torchmetrics with the same module as a custom feature extractor gives the same number
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
    for vols, is_real in ((real, True), (other, False)):
        for v in vols:
            metric.update(letterbox(torch.from_numpy(plane_slices(v, "axial"))), real=is_real)
    assert float(metric.compute()) == pytest.approx(diff["axial"].fid, rel=1e-4, abs=1e-6)
    ours = fid_from_features(
        volume_plane_features(real, extractor, "axial"), volume_plane_features(other, extractor, "axial")
    )
    assert ours == pytest.approx(diff["axial"].fid, rel=1e-12)


def test_fid_empty_generated_set_raises():
    rng = np.random.default_rng(3)
    real = [smooth_volume(rng)]
    empty = [np.full((8, 8, 8), -1.0, np.float32)]
    extractor, _ = build_extractor("random_conv")
    with pytest.raises(InputError, match="no slices in generated set"):
        fid_per_plane(real, empty, extractor, planes=("axial",))


# ----------------------------------------------------------------------------- paired metrics
def test_ms_ssim_scales_adapt_to_size():
    assert ms_ssim_scales(256, 256) == 5
    assert ms_ssim_scales(128, 128) == 4
    assert ms_ssim_scales(64, 64) == 3
    assert ms_ssim_scales(32, 32) == 2
    assert ms_ssim_scales(16, 18) == 1
    with pytest.raises(InputError, match="slices 12x12 too small for MS-SSIM"):
        ms_ssim_scales(12, 12)


@pytest.mark.parametrize("size,scales", [(64, 3), (32, 2)])
def test_paired_metrics_identical_and_noisy(size, scales):
    rng = np.random.default_rng(4)
    real = smooth_volume(rng, shape=(4, size, size))
    same = paired_metrics(real, real.copy())
    assert same["ms_ssim_scales"] == scales and same["n_slices"] == 4
    assert same["ms_ssim"] == pytest.approx(1.0, abs=1e-5) and same["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert same["psnr"] == float("inf") and same["lpips"] is None
    noisy = np.clip(real + rng.normal(0, 0.2, real.shape).astype(np.float32), -1, 1)
    res = paired_metrics(real, noisy)
    assert res["ms_ssim"] < 0.99 and res["ssim"] < 0.99
    mse = np.mean((noisy.astype(np.float64) - real) ** 2)
    assert res["psnr"] == pytest.approx(10 * np.log10(4 / mse), rel=1e-5)


def test_paired_metrics_errors():
    rng = np.random.default_rng(5)
    real = smooth_volume(rng, shape=(3, 32, 32))
    with pytest.raises(InputError, match=r"\(3, 32, 32\).*\(3, 32, 30\)"):
        paired_metrics(real, real[:, :, :30])
    with pytest.raises(InputError, match="too small for MS-SSIM"):
        paired_metrics(real[:, :10, :10], real[:, :10, :10])
    mask = np.zeros(real.shape, bool)
    mask[1, 5:9, 5:9] = True
    assert paired_metrics(real, real, mask=mask)["n_slices"] == 1


@pytest.fixture(scope="module")
def alex_features_state():
    from torchvision.models import alexnet

    torch.manual_seed(0)
    return alexnet(weights=None).features.state_dict()


def test_lpips_loads_and_matches_torchmetrics(tmp_path, alex_features_state):
    from torchmetrics.functional.image.lpips import _LPIPS

    backbone = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in alex_features_state.items()}, backbone)  # torchvision key layout
    lin_src = default_lpips_lin_path("alex")
    if not lin_src.is_file():
        pytest.skip("torchmetrics does not ship alex.pth")
    lin = tmp_path / "alex_lin.pth"
    torch.save(torch.load(lin_src, map_location="cpu"), lin)
    model = load_lpips("alex", backbone, lin)
    assert "lpips-alex" in model.description and str(backbone) in model.description
    rng = np.random.default_rng(6)
    x = torch.from_numpy(smooth_volume(rng, shape=(3, 64, 64)))[:, None]
    y = torch.clamp(x + 0.3 * torch.randn_like(x), -1, 1)
    with torch.no_grad():
        assert torch.all(model(x, x) == 0)
        d = model(x, y)
    assert d.shape == (3,) and torch.all(d > 0)
    with pytest.raises(InputError, match="slices 16x16 too small for LPIPS-alex"):
        model(x[..., :16, :16], y[..., :16, :16])

    reference = _LPIPS(pretrained=True, net="alex", pnet_rand=True)  # random backbone: no download
    split = {0: 1, 1: 1, 3: 2, 4: 2, 6: 3, 8: 4, 10: 5}  # features index -> torchmetrics slice
    reference.net.load_state_dict(
        {f"slice{split[int(k.split('.')[0])]}.{k}": v for k, v in alex_features_state.items()}
    )
    with torch.no_grad():
        expected = reference(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)).reshape(-1)
    torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-6)

    # default heads (torchmetrics' copy) and bare features layout also load
    torch.save(alex_features_state, backbone)
    default_model = load_lpips("alex", backbone)
    with torch.no_grad():
        torch.testing.assert_close(default_model(x, y), d)
    res = paired_metrics(x[:, 0].numpy(), y[:, 0].numpy(), lpips=default_model)
    assert res["lpips"] == pytest.approx(float(d.double().mean()), rel=1e-5)
    assert res["lpips_model"].startswith("lpips-alex")


def test_lpips_vgg_and_missing_files(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers  # = vgg16().features, without the classifier

    with pytest.raises(InputError, match=f"weights missing at {tmp_path / 'none.pth'}"):
        load_lpips("alex", tmp_path / "none.pth")
    torch.manual_seed(0)
    backbone = tmp_path / "vgg16_features.pth"
    features = make_layers(cfgs["D"]).state_dict()
    torch.save({"state_dict": {f"module.features.{k}": v for k, v in features.items()}}, backbone)
    with pytest.raises(InputError, match="weights missing at"):
        load_lpips("vgg", backbone, tmp_path / "no_lin.pth")
    if default_lpips_lin_path("vgg").is_file():
        from torchmetrics.functional.image.lpips import _LPIPS

        model = load_lpips("vgg", backbone)
        x = torch.rand(2, 1, 32, 32) * 2 - 1
        with torch.no_grad():
            assert torch.all(model(x, x) == 0) and torch.all(model(x, -x) > 0)
        reference = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)  # random backbone: no download
        bounds = (4, 9, 16, 23, 30)
        reference.net.load_state_dict(
            {f"slice{1 + sum(int(k.split('.')[0]) >= b for b in bounds)}.{k}": v for k, v in features.items()}
        )
        with torch.no_grad():
            torch.testing.assert_close(model(x, -x), reference(x.repeat(1, 3, 1, 1), -x.repeat(1, 3, 1, 1)).reshape(-1))
    with pytest.raises(ValueError, match="alex"):
        load_lpips("squeeze", backbone)


# ----------------------------------------------------------------------------- Dice / HD95
def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Independent MONAI-style HD95: surface = voxel with a 6-neighbour outside (array border = outside);
    the larger of the two directed 95th percentiles."""

    def surface(m):
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(p, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing, float)

    sa, sb = surface(a), surface(b)
    d = cdist(sa, sb)
    return float(max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95)))


def test_hd95_exact_cases():
    a = np.zeros((10, 8, 8), bool)
    b = np.zeros_like(a)
    a[2], b[5] = True, True  # full sheets 3 voxels apart along axis 0: every surface distance = 3 voxels
    assert hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    c, d = np.zeros((6, 8, 10), bool), np.zeros((6, 8, 10), bool)
    c[:, :, 1], d[:, :, 4] = True, True  # sheets apart along axis 2: spacing of axis 2 only
    assert hd95(c, d, (2.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(c, d, (1.0, 1.0, 0.5)) == pytest.approx(1.5)
    p, q = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
    p[0, 0, 0], q[2, 3, 4] = True, True
    assert hd95(p, q, (1.0, 1.0, 1.0)) == pytest.approx(np.sqrt(29))
    assert hd95(p, q, (2.0, 1.0, 0.5)) == pytest.approx(np.sqrt(16 + 9 + 4))
    assert hd95(a, a, (2.0, 1.0, 1.0)) == 0.0


def test_hd95_matches_brute_force_on_cubes():
    a = np.zeros((14, 12, 12), bool)
    b = np.zeros_like(a)
    a[2:8, 3:9, 3:9] = True
    b[5:11, 3:9, 3:9] = True  # same cube shifted by 3 along axis 0
    for spacing in ((2.0, 1.0, 1.0), (1.0, 0.7, 1.3)):
        assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing))
    corner = np.zeros((8, 8, 8), bool)
    corner[:3, :4, :2] = True  # touches the array border: border voxels are surface
    ball = ndimage.binary_dilation(np.pad(np.ones((1, 1, 1), bool), ((4, 3), (4, 3), (4, 3))), iterations=2)
    assert hd95(corner, ball, (1.0, 2.0, 1.0)) == pytest.approx(brute_force_hd95(corner, ball, (1.0, 2.0, 1.0)))


def test_hd95_is_monai_max_of_directed_percentiles_not_pooled():
    """Hand-computed cases where medpy's pooled percentile and MONAI's definition differ."""
    ref = np.zeros((12, 4, 12), bool)
    ref[0, 0, :10] = True  # a one-voxel-thick row: all 10 voxels are surface
    pred = ref.copy()
    pred[10, 0, 0] = True  # plus one voxel 10 voxels away from the row
    # pred -> ref: ten 0s and one 10 -> 95th percentile at rank 9.5 = 5; ref -> pred: all 0.
    # pooled (medpy): twenty 0s and one 10 -> rank 19 = 0.
    assert hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(5.0)
    assert hd95(ref, pred, (1.0, 1.0, 1.0)) == pytest.approx(5.0)  # symmetric
    assert hd95(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(10.0)  # the far voxel is 20 mm away
    two, one = np.zeros((4, 4, 14), bool), np.zeros((4, 4, 14), bool)
    two[0, 0, 0] = two[0, 0, 10] = True
    one[0, 0, 0] = True
    # directed: [0, 10] -> 9.5 and [0] -> 0; pooled [0, 0, 10] -> 9.0
    assert hd95(two, one, (1.0, 1.0, 1.0)) == pytest.approx(9.5)


def test_hd95_and_dice_empty_conventions():
    empty = np.zeros((4, 4, 4), bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert EMPTY_HD95_MM == 373.13
    assert hd95(empty, full, (1, 1, 1)) == 373.13  # empty prediction, non-empty reference (BraTS tooling)
    assert hd95(full, empty, (1, 1, 1)) == 373.13
    assert dice(empty, empty) == 1.0 and dice(full, empty) == 0.0
    half = full.copy()
    half[1] = False
    other = half.copy()
    other[2, 1, 1] = False
    other[1, 1, 1] = True  # |half| = 4, |other| = 4, overlap 3
    assert dice(half, other) == pytest.approx(2 * 3 / 8)
    with pytest.raises(InputError, match="differs"):
        dice(full, full[:3])


def test_region_metrics_brats_regions():
    ref = np.zeros((8, 10, 10), np.uint8)
    ref[2:6, 2:8, 2:8] = 2  # edema
    ref[3:5, 3:7, 3:7] = 1  # necrosis
    ref[3:5, 4:6, 4:6] = 3  # enhancing
    res = region_metrics(ref, ref, BRATS_REGIONS, spacing=(1.0, 1.0, 1.0))
    assert set(res) == {"WT", "TC", "ET"}
    for r in res.values():
        assert r["dice"] == 1.0 and r["hd95"] == 0.0
    pred = ref.copy()
    pred[pred == 3] = 1  # enhancing tumour missed
    res = region_metrics(pred, ref, BRATS_REGIONS, spacing=(1.0, 1.0, 1.0))
    assert res["WT"]["dice"] == 1.0 and res["TC"]["dice"] == 1.0
    assert res["ET"]["dice"] == 0.0 and res["ET"]["hd95"] == 373.13 and res["ET"]["n_pred"] == 0
    assert res["ET"]["n_ref"] == 8
    assert label_regions([0, 2, 1, 2]) == {"label_1": [1], "label_2": [2]}


# ----------------------------------------------------------------------------- privacy
def test_privacy_noisy_copy_is_matched_and_flagged():
    rng = np.random.default_rng(7)
    training = [smooth_volume(rng, shape=(16, 24, 24)) for _ in range(5)] + [smooth_volume(rng, shape=(18, 20, 22))]
    k = 3
    copy = training[k] + rng.normal(0, 0.05, training[k].shape).astype(np.float32)
    fresh = smooth_volume(rng, shape=(16, 24, 24))
    df = nearest_training([copy, fresh], training, resize_to=(16, 24, 24))
    assert df.loc[0, "nearest_training"] == k and df.loc[0, "nearest_training_mse"] == k
    assert df.loc[0, "pearson"] > 0.9
    baseline = training_nn_baseline(training, resize_to=(16, 24, 24))
    assert len(baseline) == 6 and (baseline["nearest_training"] != baseline["training_index"]).all()
    flagged = flag_near_copies(df, baseline, quantile=0.95)
    assert bool(flagged.loc[0, "near_copy"]) and not bool(flagged.loc[1, "near_copy"])
    strict = flag_near_copies(df, baseline, quantile=1.0)
    assert strict["threshold_pearson"].iloc[0] == pytest.approx(baseline["pearson"].max())
    with pytest.raises(InputError):
        training_nn_baseline(training[:1])
