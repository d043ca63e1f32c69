"""`fae evaluate recon`: PSNR, SSIM and rFID of reconstructed held-out images, and a grid PNG.

Pipeline: held-out images (uint8) -> frozen encoder -> [adapter: x_hat = decode(encode(x).mean)]
-> pixel decoder -> clamp to [-1, 1] -> uint8. Every metric compares the uint8 reconstructions
with the uint8 originals, so the figures describe the images as they would be saved.

Definitions (images scaled to [0, 1], one value per image, then the mean over images):
- PSNR = 10 log10(1 / MSE), MSE over all pixels and channels.
- SSIM of Wang et al. (IEEE TIP 2004): 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01,
  K2 = 0.03, population (not sample) variances, the mean over the positions where the window
  fits inside the image, averaged over the RGB channels. This equals scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)`.
- rFID: FID between the Inception features of the reconstructions and of the originals
  (`fae_cli.evaluation.fid`).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from torch import nn

from fae_cli.artifacts import atomic_write_bytes, atomic_write_text, check_compatible
from fae_cli.data.datasets import open_images
from fae_cli.encoders import build_encoder
from fae_cli.errors import FaeError
from fae_cli.evaluation.fid import evaluate_inputs
from fae_cli.evaluation.fid_inputs import MetricInput, TensorImages
from fae_cli.log import Progress, console
from fae_cli.recipe import Recipe
from fae_cli.stages.plan import RunPaths
from fae_cli.training.distributed import pick_device

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
GRID_FILE = "recon-grid.png"

# SSIM constants of Wang et al. 2004.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# PSNR of identical images is infinite; an MSE floor of 1e-10 caps it at 100 dB so that means
# and metrics.json stay finite.
MSE_FLOOR = 1e-10

GRID_COLUMNS = 8
GRID_PAIRS = 4  # rows of originals, each followed by its row of reconstructions
GRID_PADDING = 2  # pixels of white between tiles


# ----------------------------------------------------------------------------------------------
# Metrics


def psnr(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Return the PSNR in dB of each image pair; images N x C x H x W in [0, 1] (peak 1)."""
    _check_pair(reference, test)
    error = (reference.double() - test.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / error.clamp_min(MSE_FLOOR))


def gaussian_taps(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Return the normalised 1-D Gaussian of `size` taps in float64; the 2-D window is its outer product."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def _valid_filter_matrix(length: int, taps: torch.Tensor) -> torch.Tensor:
    """Return the (length - k + 1) x length matrix whose row i applies the k taps at offset i."""
    size = len(taps)
    matrix = torch.zeros(length - size + 1, length, dtype=taps.dtype, device=taps.device)
    for row in range(length - size + 1):
        matrix[row, row : row + size] = taps
    return matrix


def ssim(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Return the SSIM of each image pair; images N x C x H x W in [0, 1] (see the module doc)."""
    _check_pair(reference, test)
    height, width = reference.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {height} x {width}")
    x = reference.double()
    y = test.double()
    taps = gaussian_taps().to(x.device)
    rows = _valid_filter_matrix(height, taps)
    columns = _valid_filter_matrix(width, taps)

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        # The separable window as two matrix products: 0.3 s against 8 s for a float64
        # 11 x 11 convolution (64 images of 128 px, one CPU thread). No padding: only
        # positions where the whole window lies inside the image count.
        return rows @ image @ columns.T

    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mean_x**2
    var_y = local_mean(y * y) - mean_y**2
    covariance = local_mean(x * y) - mean_x * mean_y

    c1, c2 = SSIM_K1**2, SSIM_K2**2
    numerator = (2 * mean_x * mean_y + c1) * (2 * covariance + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)


def _check_pair(reference: torch.Tensor, test: torch.Tensor) -> None:
    if reference.shape != test.shape or reference.dim() != 4:
        raise ValueError(f"expected two image batches N x C x H x W of one shape, got {tuple(reference.shape)} and {tuple(test.shape)}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map pixel-decoder output in [-1, 1] (clamped) to uint8 [0, 255], rounding to nearest."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images to float32 in [0, 1]."""
    return images.float() / 255


# ----------------------------------------------------------------------------------------------
# Reconstruction


@torch.no_grad()
def reconstruct(images: torch.Tensor, encoder: nn.Module, decoder: nn.Module, adapter: nn.Module | None = None) -> torch.Tensor:
    """Return uint8 reconstructions of uint8 images N x 3 x H x W, on the images' device.

    Features go through the adapter's posterior mean and feature decoder when `adapter` is
    given, straight to the pixel decoder otherwise.
    """
    features = encoder(to_unit(images))
    if adapter is not None:
        mean, _ = adapter.encode(features)
        features = adapter.decode(mean).float()
    return to_uint8(decoder(features))


def save_grid(path: str | Path, originals: torch.Tensor, reconstructions: torch.Tensor, columns: int = GRID_COLUMNS) -> Path:
    """Write a PNG of uint8 images N x 3 x H x W: each row of originals above its reconstructions."""
    count = originals.shape[0]
    rows = math.ceil(count / columns)
    height, width = originals.shape[-2:]
    pad = GRID_PADDING
    canvas = np.full((2 * rows * (height + pad) + pad, min(count, columns) * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        left = pad + column * (width + pad)
        for offset, image in enumerate((originals[index], reconstructions[index])):
            top = pad + (2 * row + offset) * (height + pad)
            canvas[top : top + height, left : left + width] = image.permute(1, 2, 0).cpu().numpy()

    path = Path(path)
    atomic_write_bytes(path, _png_bytes(canvas))
    return path


def _png_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    Image.fromarray(array).save(stream, format="PNG")
    return stream.getvalue()


# ----------------------------------------------------------------------------------------------
# `fae evaluate recon`


def run_recon(
    recipe: Recipe,
    decoder: Path | None = None,
    adapter: Path | None = None,
    out: Path | None = None,
    *,
    fid: bool = True,
) -> dict[str, Any]:
    """Reconstruct held-out images and write `metrics.json` and the grid PNG into `out`.

    `decoder` defaults to the run's fine-tuned decoder when `decoder.finetune` is set, else to
    the noise-phase one. Without `adapter` the frozen features go to the pixel decoder directly.
    At most `evaluate.num_reference` held-out images are used. `fid=False` skips rFID.
    Returns the report that `metrics.json` stores.
    """
    # The loaders belong to the stages that write these artefacts.
    from fae_cli.stages.adapter import load_adapter
    from fae_cli.stages.decoders import check_adapter, load_pixel_decoder

    paths = RunPaths.of(recipe)
    if decoder is None:
        decoder = paths.decoder_finetune if recipe.decoder.finetune else paths.decoder_noise
    out = Path(out) if out is not None else paths.evaluation / "recon"
    device = pick_device(recipe.run.device)

    pixel_decoder, facts = load_pixel_decoder(decoder, device=device)
    feature_adapter = None
    if adapter is not None:
        feature_adapter, adapter_manifest = load_adapter(adapter, device=device)
        check_adapter(facts, adapter_manifest, decoder_from=f"pixel decoder {decoder}", adapter_from=f"adapter {adapter}")

    dataset = open_images(recipe.data, "holdout")
    check_compatible(
        "image size", facts["image_size"], recipe.data.image_size, expected_from=f"pixel decoder {decoder}", actual_from="recipe data.image_size"
    )
    encoder = _build_encoder(recipe, facts, decoder, device)
    count = min(len(dataset), recipe.evaluate.num_reference)

    originals, reconstructions, skipped = _reconstruct_dataset(dataset, count, encoder, pixel_decoder, feature_adapter, recipe.evaluate.batch_size, device)
    if len(originals) == 0:
        raise FaeError(f"no readable held-out images in {dataset.source}: check data.source and data.holdout")
    psnr_values = _per_image(psnr, originals, reconstructions, recipe.evaluate.batch_size)
    ssim_values = _per_image(ssim, originals, reconstructions, recipe.evaluate.batch_size)

    metrics: dict[str, float] = {"psnr": float(psnr_values.mean()), "ssim": float(ssim_values.mean())}
    fid_report = None
    if fid:
        fid_report = evaluate_inputs(
            MetricInput(out / "reconstructions", "tensor", images=TensorImages(reconstructions)),
            MetricInput(Path(dataset.source), "tensor", images=TensorImages(originals)),
            metrics=["fid"],
            batch_size=recipe.evaluate.batch_size,
            weights=recipe.evaluate.inception_weights,
            device=recipe.run.device,
            labels=("reconstructions", "originals"),
        )
        metrics["rfid"] = float(fid_report["metrics"]["fid"])

    grid = save_grid(out / GRID_FILE, originals[: GRID_COLUMNS * GRID_PAIRS], reconstructions[: GRID_COLUMNS * GRID_PAIRS])
    report = {
        "metrics": metrics,
        "count": len(originals),
        "skipped": skipped,
        "decoder": str(Path(decoder).resolve()),
        "decoder_phase": facts["phase"],
        "adapter": str(Path(adapter).resolve()) if adapter is not None else None,
        "encoder": facts["encoder"],
        "image_size": facts["image_size"],
        "data": dataset.describe(),
        "definitions": {
            "psnr": "mean over images of 10 log10(1 / MSE) on uint8 images scaled to [0, 1]",
            "ssim": "mean over images; 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population variances, valid positions, mean over RGB",
            "rfid": "FID of reconstructions against the same held-out originals",
        },
        "rfid": fid_report,
        "grid": GRID_FILE,
    }
    atomic_write_text(out / METRICS_FILE, json.dumps(report, indent=2) + "\n")
    summary = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
    log.info("reconstructions of %d held-out images: %s; wrote %s and %s", len(originals), summary, out / METRICS_FILE, grid)
    return report


def _per_image(metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], originals: torch.Tensor, reconstructions: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply `metric` to uint8 image pairs in batches; float64 temporaries of every image at once would need gigabytes."""
    values = []
    for start in range(0, len(originals), batch_size):
        stop = start + batch_size
        values.append(metric(to_unit(originals[start:stop]), to_unit(reconstructions[start:stop])))
    return torch.cat(values)


def _build_encoder(recipe: Recipe, facts: dict[str, Any], decoder: Path, device: torch.device) -> nn.Module:
    """Build the frozen encoder the decoder was trained on and check its weights."""
    check_compatible("encoder", facts["encoder"], recipe.encoder.name, expected_from=f"pixel decoder {decoder}", actual_from="recipe encoder.name")
    encoder = build_encoder(facts["encoder"], weights=recipe.encoder.weights, input_size=facts["input_size"], device=device)
    check_compatible(
        "encoder weights hash", facts["weights_hash"], encoder.weights_hash, expected_from=f"pixel decoder {decoder}", actual_from=f"encoder {encoder.name} ({encoder.weights_source})"
    )
    return encoder


def _reconstruct_dataset(
    dataset: Any,
    count: int,
    encoder: nn.Module,
    decoder: nn.Module,
    adapter: nn.Module | None,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Reconstruct the first `count` images; return uint8 originals and reconstructions on CPU."""
    originals: list[torch.Tensor] = []
    reconstructions: list[torch.Tensor] = []
    skipped: list[str] = []
    columns = (TextColumn("reconstruct"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("reconstruct", total=count)
        for start in range(0, count, batch_size):
            batch = []
            for index in range(start, min(start + batch_size, count)):
                image, _, reason = dataset.read(index)
                if image is None:
                    skipped.append(f"{dataset.name(index)}: {reason}")
                    continue
                batch.append(image)
            if batch:
                images = torch.stack(batch)
                originals.append(images)
                reconstructions.append(reconstruct(images.to(device), encoder, decoder, adapter).cpu())
            progress.advance(task, min(batch_size, count - start))
    if skipped:
        log.warning("skipped %d unreadable held-out image(s), e.g. %s", len(skipped), skipped[0])
    if not originals:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8), skipped
    return torch.cat(originals), torch.cat(reconstructions), skipped
