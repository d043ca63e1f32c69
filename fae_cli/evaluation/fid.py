"""`fae evaluate fid`: FID, sFID, KID, precision/recall and Inception Score of samples.

Inception features come from torch-fidelity's network (`inception.py`), and KID, precision/recall
and the Inception Score from torch-fidelity's own metric functions with its defaults. FID and
sFID are Fréchet distances in float64 (`frechet.py`), so that a reference given only as
statistics (ADM's `mu`/`sigma`, `mu_s`/`sigma_s`) can be used. sFID follows ADM's evaluator:
the first 7 channels of the 17 x 17 map of `Mixed_6d.branch1x1`, flattened to 2023-d.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fae_cli import __version__
from fae_cli.artifacts import atomic_write_text
from fae_cli.errors import FaeError
from fae_cli.evaluation.fid_inputs import ImageBatches, MetricInput, open_input, statistics_label
from fae_cli.evaluation.frechet import GaussianStats, frechet_distance
from fae_cli.evaluation.inception import InceptionFeatures, resolve_weights
from fae_cli.log import Progress, console
from fae_cli.training.distributed import pick_device

log = logging.getLogger(__name__)

METRIC_NAMES = ("fid", "kid", "prc", "sfid", "isc")
METRICS_FILE = "metrics.json"

# torch-fidelity 0.4 defaults (defaults.py); KID's subset size shrinks to the smaller side.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3
ISC_SPLITS = 10
RNG_SEED = 2020

RESIZE_METHOD = "TF1-compatible bilinear resize of uint8 RGB to 299 x 299 (torch-fidelity), then (x - 128) / 128"


def run_fid(
    samples: str | Path,
    reference: str | Path,
    *,
    metrics: Sequence[str] = ("fid",),
    batch_size: int = 64,
    out: str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    network: InceptionFeatures | None = None,
) -> dict[str, Any]:
    """Score a sample folder or .npz against a reference, print a table and write `out/metrics.json`.

    Returns the report that `metrics.json` stores; its "metrics" maps each computed metric
    ("fid", "sfid", "kid", "kid_std", "precision", "recall", "isc", "isc_std") to its value.
    """
    sample_input = open_input(samples, role="samples")
    reference_input = open_input(reference, role="reference")
    report = evaluate_inputs(
        sample_input,
        reference_input,
        metrics=metrics,
        batch_size=batch_size,
        weights=Path(weights) if weights is not None else None,
        device=device,
        network=network,
    )
    print_report(report)
    if out is not None:
        path = Path(out) / METRICS_FILE
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", path)
    return report


def evaluate_inputs(
    samples: MetricInput,
    reference: MetricInput,
    *,
    metrics: Sequence[str] = ("fid",),
    batch_size: int = 64,
    weights: Path | None = None,
    device: str = "auto",
    network: InceptionFeatures | None = None,
    labels: tuple[str, str] = ("samples", "reference"),
) -> dict[str, Any]:
    """Compute the requested metrics of `samples` against `reference` and return the report.

    Pass `network` to reuse one Inception across calls (periodic evaluation during training);
    `weights` and `device` then come from it. `labels` name the two sides in progress output.
    """
    requested = _check_metrics(metrics, reference)
    reference_needs_images = (
        ("fid" in requested and "pool" not in reference.stats)
        or ("sfid" in requested and "spatial" not in reference.stats)
        or "kid" in requested
        or "prc" in requested
    )

    if network is None:
        inception_weights = resolve_weights(weights, need_logits="isc" in requested)
        network = InceptionFeatures(inception_weights, spatial="sfid" in requested, logits="isc" in requested, device=pick_device(device))
        log.info("Inception weights: %s (%s, sha256 %s)", inception_weights.path, inception_weights.source, inception_weights.sha256[:12])
    elif ("sfid" in requested and not network.spatial_requested) or ("isc" in requested and not network.logits_requested):
        raise ValueError("the given InceptionFeatures was built without the spatial features or logits these metrics need")

    sample_features = extract_features(network, samples.images, batch_size, labels[0])
    reference_features = extract_features(network, reference.images, batch_size, labels[1]) if reference_needs_images else {}

    values: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    notes: list[str] = []
    warnings: list[str] = []
    settings: dict[str, Any] = {"metrics": requested, "batch_size": batch_size, "rng_seed": RNG_SEED}
    for metric, feature in (("fid", "pool"), ("sfid", "spatial")):
        if metric not in requested:
            continue
        sample_stats = _fit(sample_features[feature], "sample", metric, warnings)
        if feature in reference.stats:
            reference_stats = reference.stats[feature]
            notes.append(f"{metric.upper()} uses the precomputed reference statistics {statistics_label(feature)} of {reference.path}")
        else:
            reference_stats = _fit(reference_features[feature], "reference", metric, warnings)
        values[metric] = frechet_distance(sample_stats, reference_stats)

    if "kid" in requested:
        _kid(sample_features["pool"], reference_features["pool"], values, settings)
    if "prc" in requested:
        _precision_recall(sample_features["pool"], reference_features["pool"], values, unavailable, settings)
    if "isc" in requested:
        _inception_score(network, sample_features, values, unavailable, settings)

    for note in notes:
        log.info(note)
    for warning in warnings:
        log.warning(warning)
    return {
        "metrics": values,
        "unavailable": unavailable,
        "n_samples": len(sample_features["pool"]),
        "n_reference": len(reference_features["pool"]) if reference_features else None,
        "samples": samples.describe(),
        "reference": reference.describe(),
        "notes": notes,
        "warnings": warnings,
        "settings": settings,
        "inception": {
            "weights": network.weights.describe(),
            "resize": RESIZE_METHOD,
            "fid_features": "pool3, 2048-d",
            "sfid_features": "Mixed_6d.branch1x1 first 7 channels, 17 x 17 x 7 flattened (h, w, c), 2023-d",
        },
        "versions": {"fae": __version__, "torch_fidelity": _package_version("torch-fidelity"), "torch": torch.__version__},
        "device": str(network.device),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_metrics(metrics: Sequence[str], reference: MetricInput) -> list[str]:
    """Validate metric names and reject those the reference cannot serve, before any work."""
    requested = list(dict.fromkeys(metrics))
    unknown = [name for name in requested if name not in METRIC_NAMES]
    if unknown or not requested:
        raise FaeError(f"unknown metrics {unknown or '(none given)'}; choose from {', '.join(METRIC_NAMES)}")
    if reference.images is None:
        only = "statistics (" + ", ".join(statistics_label(name) for name in sorted(reference.stats)) + ")"
        for metric, feature in (("fid", "pool"), ("sfid", "spatial"), ("kid", None), ("prc", None)):
            if metric in requested and (feature is None or feature not in reference.stats):
                raise FaeError(
                    f"{metric} needs reference images, but {reference.path} contains only {only}; "
                    f"remove {metric} from the metrics or use a reference folder or an .npz with arr_0"
                )
    return requested


def extract_features(network: InceptionFeatures, images: ImageBatches, batch_size: int, label: str) -> dict[str, np.ndarray]:
    """Run every image through Inception; return float32 arrays by feature name ("pool", ...)."""
    collected: dict[str, list[np.ndarray]] = {}
    columns = (TextColumn(f"Inception on {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"Inception on {label}", total=images.count)
        for batch in images.batches(batch_size):
            for name, value in network(batch).items():
                collected.setdefault(name, []).append(value.float().cpu().numpy())
            progress.advance(task, len(batch))
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def _fit(features: np.ndarray, side: str, metric: str, warnings: list[str]) -> GaussianStats:
    count, width = features.shape
    if count < 2:
        raise FaeError(f"{metric} needs at least 2 {side} images, got {count}")
    if count < width:
        # With N < D the sample covariance is singular and FID is biased upward. ADM's
        # published numbers use 50,000 samples.
        warnings.append(
            f"{metric.upper()} from {count} {side} images, fewer than its {width} feature dimensions: "
            "the covariance is singular and the value is biased upward"
        )
    return GaussianStats.from_features(features)


def _kid(samples: np.ndarray, reference: np.ndarray, values: dict[str, float], settings: dict[str, Any]) -> None:
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    subset_size = min(KID_SUBSET_SIZE, len(samples), len(reference))
    if subset_size < 2:
        raise FaeError(f"KID needs at least 2 images on each side, got {len(samples)} and {len(reference)}")
    result = kid_features_to_metric(
        torch.from_numpy(samples),
        torch.from_numpy(reference),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=subset_size,
        rng_seed=RNG_SEED,
        verbose=False,
    )
    values["kid"] = result[KEY_METRIC_KID_MEAN]
    values["kid_std"] = result[KEY_METRIC_KID_STD]
    settings.update(kid_subsets=KID_SUBSETS, kid_subset_size=subset_size, kid_kernel="polynomial, degree 3, gamma 1/D, coef0 1")


def _precision_recall(
    samples: np.ndarray, reference: np.ndarray, values: dict[str, float], unavailable: dict[str, str], settings: dict[str, Any]
) -> None:
    from torch_fidelity.metric_prc import (
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    # Each point's radius is the distance to its k-th nearest neighbour other than itself.
    if min(len(samples), len(reference)) <= PRC_NEIGHBORHOOD:
        unavailable["prc"] = f"precision/recall needs more than {PRC_NEIGHBORHOOD} images on each side, got {len(samples)} and {len(reference)}"
        return
    result = prc_features_to_metric(
        torch.from_numpy(samples), torch.from_numpy(reference), prc_neighborhood=PRC_NEIGHBORHOOD, verbose=False
    )
    values["precision"] = result[KEY_METRIC_PRECISION]
    values["recall"] = result[KEY_METRIC_RECALL]
    settings["prc_neighborhood"] = PRC_NEIGHBORHOOD
    settings["prc_features"] = "Inception pool3 as in ADM's evaluator (torch-fidelity's own default is VGG-16)"


def _inception_score(
    network: InceptionFeatures, features: dict[str, np.ndarray], values: dict[str, float], unavailable: dict[str, str], settings: dict[str, Any]
) -> None:
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )

    if not network.has_logits:
        unavailable["isc"] = (
            f"the Inception weights ({network.weights.source}) have no logits layer; put torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth into $TORCH_HOME/hub/checkpoints/ to compute it"
        )
        return
    logits = torch.from_numpy(features["logits"])
    splits = min(ISC_SPLITS, len(logits))
    result = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=RNG_SEED)
    values["isc"] = result[KEY_METRIC_ISC_MEAN]
    values["isc_std"] = result[KEY_METRIC_ISC_STD]
    settings["isc_splits"] = splits


def print_report(report: dict[str, Any]) -> None:
    """Print the metrics as a table, with the inputs, the weights and any notes below it."""
    table = Table(title="evaluate fid")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    for name in report["unavailable"]:
        table.add_row(name, "unavailable", style="dim")
    console.print(table)

    samples, reference = report["samples"], report["reference"]
    console.print(f"samples: {samples['path']} ({report['n_samples']} images)", highlight=False)
    statistics = f", statistics {', '.join(reference['statistics'])}" if reference["statistics"] else ""
    console.print(f"reference: {reference['path']} ({report['n_reference'] or 0} images used{statistics})", highlight=False)
    weights = report["inception"]["weights"]
    console.print(f"Inception: {weights['source']}, sha256 {weights['sha256'][:16]}", highlight=False)
    for name, reason in report["unavailable"].items():
        console.print(f"{name} unavailable: {reason}", highlight=False)


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
