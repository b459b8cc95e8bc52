"""Slice feature extractors for FID, chosen by name, with weights from LOCAL files only.

Every extractor is an ``nn.Module`` that takes grey slices ``(N, 1, H, W)`` with values in [-1, 1]
and returns ``(N, D)`` float features; it carries ``num_features`` (so torchmetrics'
``FrechetInceptionDistance(feature=module)`` accepts it) and ``description`` (the text that goes
into every table, so no number is mistaken for the paper's).

Names (``build_extractor``):

``radimagenet_resnet50``
    ResNet-50 trunk pretrained on RadImageNet (the paper's FID network; the authors load it from
    torch hub "Warvito/radimagenet-models"). Output: layer4 feature map averaged over space, 2048-d.
    Preprocessing (the MONAI Generative Models FID recipe used with that port, i.e. Keras/caffe
    style without std division): clip to [-1, 1] -> [0, 1]; bilinear resize to 224 x 224
    (antialiased when shrinking); grey -> 3 identical channels (the RGB->BGR swap is then a no-op);
    subtract the ImageNet mean in BGR order (0.406, 0.456, 0.485); no division by the std.
    Accepted weight files (torch or safetensors files, read by gem3d.models.weights_file: tensors only):

    * the hub port's ``RadImageNet-ResNet50_notop.pth``: a Keras-converted ResNet-50 whose
      convolutions have biases and whose bottlenecks stride in the first 1x1 convolution; keys as
      torchvision's (``conv1.weight``, ``conv1.bias``, ``layer1.0.conv1.bias``,
      ``layer1.0.downsample.0.bias`` ...). Detected by the presence of ``conv1.bias``.
    * a torchvision ``resnet50`` state_dict (``fc.*`` ignored).
    * the BMEII-AI RadImageNet PyTorch example layout: ``nn.Sequential(*list(resnet50().children())
      [:-1])`` saved as ``backbone.0.weight``, ``backbone.4.0.conv1.weight`` ...: indices
      0/1/4/5/6/7 are mapped to conv1/bn1/layer1..layer4.
    * any of these wrapped in a dict under ``state_dict`` / ``model`` / ``model_state_dict`` /
      ``net``, with keys prefixed ``module.``, ``backbone.``, ``model.``, ``encoder.`` or
      ``_orig_mod.``; failing that, one unknown prefix shared by the keys is found by NAME
      (``<prefix><model key>``), never by shape order (a shape-order guess could load a wrong
      network silently).

``inception_v3``
    torchvision Inception-v3 (ImageNet) pool3 features, 2048-d, from the torchvision checkpoint
    (``inception_v3_google-0cc3c7bd.pth``; ``AuxLogits.*`` and ``fc.*`` ignored). Input: clip,
    bilinear resize to 299, 3 channels, values kept in [-1, 1] (what torchvision's
    ``transform_input`` produces from ImageNet-normalised input). NOT the TF "FID Inception" of
    pytorch-fid/torch-fidelity: numbers differ from standard published FIDs.

``random_conv``
    A small convolutional network with fixed-seed random weights (no file). Deterministic for a
    given torch version; for the demo and CI only: NOT comparable to any published FID.

A missing file raises ``InputError("weights missing at PATH")``; a file whose keys do not fit
raises ``InputError`` naming the file and the first missing keys.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gem3d.io import InputError, file_sha256

EXTRACTOR_NAMES = ("radimagenet_resnet50", "inception_v3", "random_conv")

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
_KNOWN_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.")
# BGR order (the Keras/caffe preprocessing RadImageNet was trained with), on a [0, 1] scale.
RADIMAGENET_MEAN_BGR = (0.406, 0.456, 0.485)


# ----------------------------------------------------------------------------- weight files
def load_state_dict_file(path: str | Path | None, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, read by gem3d.models.weights_file (tensors and containers only:
    nothing the file names is imported or run); ``state_dict``-style wrappers unwrapped. InputError on failure,
    saying what the file is."""
    from gem3d.models.weights_file import read_weights_file, state_dict_of

    if path is None:
        raise InputError(f"{what}: weights missing at None (pass a local weights file; nothing is downloaded)")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights missing at {path}")
    obj = read_weights_file(path, what)
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    return state_dict_of(obj, path, what)


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_known_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.``/``backbone.``/... from the keys that carry them (repeatedly)."""
    changed = True
    while changed:
        changed = False
        for prefix in _KNOWN_PREFIXES:
            if any(k.startswith(prefix) for k in state):
                state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
                changed = True
    return state


def _strip_unknown_prefix(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Find one prefix p with ``p + model_key`` in the file for most model keys, and strip it."""
    counts: Counter[str] = Counter()
    for key in state:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in wanted:
                counts[".".join(parts[:i]) + "."] += 1
    if not counts:
        return state
    prefix, _ = counts.most_common(1)[0]
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_into(
    module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, ignore: Callable[[str], bool] = lambda k: False
) -> None:
    """Load ``state`` into ``module``: every module key must be present with its shape (extra keys ignored)."""
    target = module.state_dict()
    wanted = {k for k in target if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not ignore(k)}
    if not wanted <= set(state):
        candidate = _strip_unknown_prefix(state, wanted)
        if len(wanted & set(candidate)) > len(wanted & set(state)):
            state = candidate
    missing = sorted(wanted - set(state), key=list(target).index)
    if missing:
        raise InputError(
            f"{path}: keys do not match {type(module).__name__}: {len(missing)} missing, first: {missing[:5]}"
            f" (file keys start: {list(state)[:3]})"
        )
    for key in wanted:
        if tuple(state[key].shape) != tuple(target[key].shape):
            raise InputError(
                f"{path}: shape of {key} is {tuple(state[key].shape)}, expected {tuple(target[key].shape)}"
            )
    module.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)


# ----------------------------------------------------------------------------- ResNet-50 trunks
class KerasBottleneck(nn.Module):
    """Keras ResNet50 v1 block: biased convs, stride in the first 1x1 conv, BN eps 1.001e-5."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        eps = 1.001e-5
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=True)
        self.bn1 = nn.BatchNorm2d(planes, eps=eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(planes * 4, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class KerasResNet50(nn.Module):
    """The RadImageNet Keras ResNet-50 ("notop") as ported to PyTorch on torch hub; returns layer4 maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=1.001e-5)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)  # after ReLU, -inf padding == zero padding
        inplanes = 64
        layers = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            down = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=True), nn.BatchNorm2d(planes * 4, eps=1.001e-5)
            )
            seq = [KerasBottleneck(inplanes, planes, stride, down)]
            inplanes = planes * 4
            seq += [KerasBottleneck(inplanes, planes) for _ in range(1, blocks)]
            layers.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchvisionResNet50Trunk(nn.Module):
    """torchvision resnet50 without avgpool/fc; returns layer4 maps. Keys are torchvision's."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


_SEQUENTIAL_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _resnet_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Normalise keys of a ResNet-50 checkpoint; return (state, layout name)."""
    state = strip_known_prefixes(state)
    layout = "torchvision"
    if "conv1.weight" not in state and "0.weight" in state and state["0.weight"].ndim == 4:
        # nn.Sequential(*list(resnet50().children())[:-1]) -> conv1, bn1, relu, maxpool, layer1..4, avgpool
        state = {
            (_SEQUENTIAL_RESNET[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]): v
            for k, v in state.items()
            if k.split(".", 1)[0] in _SEQUENTIAL_RESNET
        }
        layout = "sequential"
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if any(k == "conv1.bias" or k.endswith(".conv1.bias") for k in state):
        layout = "keras-hub" if layout == "torchvision" else f"{layout}+keras"
    return state, layout


# ----------------------------------------------------------------------------- extractors
def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    shrink = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _to_grey(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"extractor input must be (N, 1, H, W) grey slices, got {tuple(x.shape)}")
    return x.float().clamp(-1.0, 1.0)


class RadImageNetResNet50(nn.Module):
    def __init__(self, trunk: nn.Module, image_size: int | None = 224):
        super().__init__()
        self.trunk = trunk
        self.image_size = image_size
        self.num_features = 2048
        self.description = "radimagenet_resnet50"
        self.register_buffer("mean_bgr", torch.tensor(RADIMAGENET_MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize((_to_grey(x) + 1.0) / 2.0, self.image_size)  # (n 1 s s) in [0, 1]
        x = x.repeat(1, 3, 1, 1)[:, [2, 1, 0]] - self.mean_bgr  # (n 3 s s), BGR, mean removed
        return self.trunk(x).mean(dim=(2, 3))  # (n 2048)


class InceptionV3Pool3(nn.Module):
    def __init__(self, net: nn.Module, image_size: int = 299):
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.num_features = 2048
        self.description = "inception_v3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(_to_grey(x), self.image_size).repeat(1, 3, 1, 1)  # (n 3 299 299) in [-1, 1]
        return self.net(x)  # fc is Identity: (n 2048)


class RandomConvExtractor(nn.Module):
    """Fixed-seed random conv net: 64 x 64 input, four stride-2 convs, global mean pooling, 64-d."""

    def __init__(self, seed: int = 0, image_size: int = 64):
        super().__init__()
        self.image_size = image_size
        chans = (1, 16, 32, 64, 64)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
        self.requires_grad_(False)
        self.num_features = chans[-1]
        self.description = f"random_conv (seed {seed}; weights-free, not comparable to published FID)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(_to_grey(x), self.image_size)  # (n 1 64 64)
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return x.mean(dim=(2, 3))  # (n 64)


def _weights_text(path: Path, layout: str | None = None) -> str:
    extra = f", layout {layout}" if layout else ""
    return f"weights: {path}, sha256 {file_sha256(path)[:12]}{extra}"


def build_radimagenet_resnet50(weights_path: str | Path | None, image_size: int | None = 224) -> RadImageNetResNet50:
    state, layout = _resnet_layout(load_state_dict_file(weights_path, "radimagenet_resnet50 weights"))
    trunk = KerasResNet50() if "keras" in layout else TorchvisionResNet50Trunk()
    load_into(trunk, state, weights_path)
    model = RadImageNetResNet50(trunk, image_size=image_size)
    model.description = (
        f"radimagenet_resnet50 ({_weights_text(Path(weights_path), layout)}; "
        f"input [0,1] resized to {image_size}, BGR mean subtracted)"
    )
    return model


def build_inception_v3(weights_path: str | Path | None) -> InceptionV3Pool3:
    from torchvision.models import inception_v3

    state = strip_known_prefixes(load_state_dict_file(weights_path, "inception_v3 weights"))
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    net.fc = nn.Identity()
    load_into(net, state, weights_path, ignore=lambda k: k.startswith(("AuxLogits.", "fc.")))
    model = InceptionV3Pool3(net)
    model.description = (
        f"inception_v3 (torchvision ImageNet, pool3; {_weights_text(Path(weights_path))}; "
        "not the TF FID-Inception)"
    )
    return model


def build_extractor(name: str, weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
    """Return ``(module, description)``: module maps (N,1,H,W) in [-1,1] to (N,D) features, eval mode."""
    if name == "radimagenet_resnet50":
        model = build_radimagenet_resnet50(weights_path)
    elif name == "inception_v3":
        model = build_inception_v3(weights_path)
    elif name == "random_conv":
        if weights_path is not None:
            raise ValueError(f"random_conv takes no weights file (got {weights_path})")
        model = RandomConvExtractor()
    else:
        raise ValueError(f"unknown extractor {name!r}; allowed: {', '.join(EXTRACTOR_NAMES)}")
    model = model.eval().to(device)
    model.requires_grad_(False)
    return model, model.description


def checked_extractor(name: str, weights_path: str | Path | None, device: str | torch.device = "cpu",
                      weights_key: str = "fid_weights", extractor_key: str = "fid_extractor", unset: str = "null"):
    """`build_extractor` after checking its weights setting, ``(module, description)``.

    ``weights_key`` / ``extractor_key`` name where the settings came from in the one-line InputError (config keys
    for the pipeline, command-line options for `gem3d score`); ``unset`` says how that source leaves a setting
    out ("null" in a config). random_conv takes no file; the others need an existing local file.
    """
    if name == "random_conv":
        if weights_path is not None:
            raise InputError(f"{weights_key} must be {unset} for {extractor_key} random_conv")
        return build_extractor("random_conv", None, device)
    if weights_path is None:
        raise InputError(f"{weights_key} is not set: the {name} extractor loads a local weights file (nothing is "
                         f"downloaded; {extractor_key} random_conv needs none)")
    if not Path(weights_path).is_file():
        raise InputError(f"{weights_key}: weights missing at {weights_path}")
    return build_extractor(name, weights_path, device)
