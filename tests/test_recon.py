"""`fae evaluate recon`: PSNR and SSIM against scikit-image, the report, the grid and adapter checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_train_decoders import HOLDOUT_IMAGES, SIZE, _one_thread, build_noise_decoder, tiny_recipe  # noqa: F401 (fixture)

from fae_cli.errors import FaeError
from fae_cli.evaluation import recon
from fae_cli.evaluation.recon import psnr, ssim
from fae_cli.stages import adapter


def _pairs(seed: int, shape=(3, 3, 24, 40)):
    """Two batches of uint8-valued images in [0, 1]: random, and a smoothed noisy copy."""
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randint(0, 256, shape, generator=generator).float() / 255
    noise = torch.randn(shape, generator=generator) * 0.1
    blurred = torch.nn.functional.avg_pool2d(reference, 3, stride=1, padding=1, count_include_pad=False)
    test = ((blurred + noise).clamp(0, 1) * 255).round() / 255
    return reference, test


def _skimage_ssim(reference: torch.Tensor, test: torch.Tensor) -> float:
    return structural_similarity(
        reference.permute(1, 2, 0).double().numpy(),
        test.permute(1, 2, 0).double().numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=2,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_matches_skimage(seed):
    reference, test = _pairs(seed)
    values = psnr(reference, test)
    for index in range(len(reference)):
        expected = peak_signal_noise_ratio(reference[index].double().numpy(), test[index].double().numpy(), data_range=1.0)
        assert float(values[index]) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_skimage(seed):
    reference, test = _pairs(seed)
    values = ssim(reference, test)
    for index in range(len(reference)):
        assert float(values[index]) == pytest.approx(_skimage_ssim(reference[index], test[index]), abs=1e-9)


def test_ssim_matches_skimage_on_smooth_images():
    # Smooth gradients exercise the luminance and contrast terms more than noise does.
    rows = torch.linspace(0, 1, 32)[:, None]
    columns = torch.linspace(0, 1, 32)[None, :]
    reference = torch.stack([rows * columns, rows.expand(32, 32), columns.expand(32, 32)])[None]
    test = (reference * 0.8 + 0.1).clamp(0, 1)
    assert float(ssim(reference, test)[0]) == pytest.approx(_skimage_ssim(reference[0], test[0]), abs=1e-9)


def test_psnr_constant_offset_by_hand():
    reference = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    assert float(psnr(reference, reference + 0.1)[0]) == pytest.approx(20.0, abs=1e-6)


def test_psnr_identical_is_capped():
    reference = torch.rand(1, 3, 16, 16)
    assert float(psnr(reference, reference)[0]) == pytest.approx(100.0)


def test_ssim_identical_is_one():
    reference = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(reference, reference), torch.ones(2, dtype=torch.float64))


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_to_uint8_rounds_and_clamps():
    values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert recon.to_uint8(values).tolist() == [0, 0, 128, 255, 255]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recon")
    recipe = build_noise_decoder(root)
    run = root / "runs" / recipe.run.name
    report = recon.run_recon(recipe, decoder=run / "decoder-noise", out=root / "eval")
    return root, recipe, report


def _grid_tiles(path) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the grid PNG back into its original and reconstruction tiles (one row pair)."""
    canvas = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    pad = recon.GRID_PADDING
    originals, reconstructions = [], []
    for column in range(HOLDOUT_IMAGES):
        left = pad + column * (SIZE + pad)
        originals.append(canvas[:, pad : pad + SIZE, left : left + SIZE])
        top = pad + SIZE + pad
        reconstructions.append(canvas[:, top : top + SIZE, left : left + SIZE])
    return torch.stack(originals), torch.stack(reconstructions)


def test_report_written(evaluated):
    root, _, report = evaluated
    stored = json.loads((root / "eval" / "metrics.json").read_text())
    assert stored["metrics"] == report["metrics"]
    assert stored["count"] == HOLDOUT_IMAGES
    assert stored["adapter"] is None
    assert stored["decoder_phase"] == "noise"


def test_grid_size(evaluated):
    root, _, _ = evaluated
    width, height = Image.open(root / "eval" / recon.GRID_FILE).size
    pad = recon.GRID_PADDING
    assert (width, height) == (HOLDOUT_IMAGES * (SIZE + pad) + pad, 2 * (SIZE + pad) + pad)


def test_grid_originals_are_holdout_images(evaluated):
    root, recipe, _ = evaluated
    from fae_cli.data.datasets import open_images

    originals, _ = _grid_tiles(root / "eval" / recon.GRID_FILE)
    dataset = open_images(recipe.data, "holdout")
    assert torch.equal(originals, torch.stack([dataset[index][0] for index in range(HOLDOUT_IMAGES)]))


def test_metrics_match_grid_images(evaluated):
    root, _, report = evaluated
    originals, reconstructions = _grid_tiles(root / "eval" / recon.GRID_FILE)
    expected_psnr = float(psnr(recon.to_unit(originals), recon.to_unit(reconstructions)).mean())
    expected_ssim = float(ssim(recon.to_unit(originals), recon.to_unit(reconstructions)).mean())
    assert report["metrics"]["psnr"] == pytest.approx(expected_psnr, abs=1e-9)
    assert report["metrics"]["ssim"] == pytest.approx(expected_ssim, abs=1e-9)


def test_rfid_reported(evaluated):
    _, _, report = evaluated
    assert report["metrics"]["rfid"] == report["rfid"]["metrics"]["fid"]
    assert report["metrics"]["rfid"] > 0


def test_recon_through_adapter(evaluated):
    root, recipe, report = evaluated
    run = root / "runs" / recipe.run.name
    adapter.run(recipe)
    through = recon.run_recon(recipe, decoder=run / "decoder-noise", adapter=run / "adapter", out=root / "eval-adapter", fid=False)
    assert through["adapter"] == str((run / "adapter").resolve())
    assert "rfid" not in through["metrics"]
    assert through["metrics"]["psnr"] != report["metrics"]["psnr"]


def test_recon_rejects_other_image_size(evaluated):
    root, _, _ = evaluated
    recipe = tiny_recipe(root, "data.image_size=64")
    run = root / "runs" / recipe.run.name
    with pytest.raises(FaeError, match="image size mismatch"):
        recon.run_recon(recipe, decoder=run / "decoder-noise", out=root / "eval-64", fid=False)
