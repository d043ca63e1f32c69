"""`fae sample`: per-sample seeds, batch and world-size invariance, resume, outputs, rounding."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from generator_pipeline import CLASSES, IMAGE_SIZE, build_inputs, tiny_recipe
from PIL import Image

from fae_cli.artifacts import write_manifest
from fae_cli.errors import FaeError
from fae_cli.recipe import to_toml
from fae_cli.stages import generator, sample
from fae_cli.stages.generation import (
    LatentSampler,
    draw_inputs,
    generate_latents,
    load_generator,
    sample_labels,
    to_uint8,
)
from fae_cli.stages.latents import run_latents
from fae_cli.stages.plan import RunPaths
from fae_cli.training.checkpoint import latest_checkpoint

FLOW = ["generator.family='flow'", "generator.model='STARFlow-debug'"]


@pytest.fixture(autouse=True)
def _one_thread():
    # torchrun starts each rank with one thread; the in-process runs match it.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sample")
    recipe = build_inputs(root)
    run_latents(recipe, RunPaths.of(recipe).adapter)
    generator.run(recipe)
    flow_recipe = tiny_recipe(root, *FLOW)
    generator.run(flow_recipe, out=root / "flow")
    return root, recipe, flow_recipe


def pngs(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((folder / "images").glob("*.png"))}


def with_sample(recipe, **values):
    changed = recipe.model_copy(deep=True)
    for key, value in values.items():
        setattr(changed.sample, key, value)
    return changed


def test_batch_sizes_give_identical_pngs(trained, tmp_path):
    _, recipe, _ = trained
    four = pngs(sample.run(with_sample(recipe, batch_size=4), out=tmp_path / "four"))
    five = pngs(sample.run(with_sample(recipe, batch_size=5), out=tmp_path / "five"))
    assert list(four) == [f"{i:06d}.png" for i in range(12)]
    assert four == five


def test_flow_batch_sizes_give_identical_pngs(trained, tmp_path):
    root, _, flow_recipe = trained
    four = pngs(sample.run(with_sample(flow_recipe, batch_size=4), generator=root / "flow", out=tmp_path / "four"))
    five = pngs(sample.run(with_sample(flow_recipe, batch_size=5), generator=root / "flow", out=tmp_path / "five"))
    assert len(four) == 12
    assert four == five


def test_samples_differ_between_indices(trained, tmp_path):
    _, recipe, _ = trained
    images = pngs(sample.run(recipe, out=tmp_path / "out"))
    assert len(set(images.values())) == 12


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_give_identical_pngs(trained, tmp_path):
    root, recipe, _ = trained
    single = pngs(sample.run(with_sample(recipe, batch_size=4), out=tmp_path / "one-rank"))

    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(to_toml(with_sample(recipe, batch_size=5)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(_free_port()),
        "-m", "fae_cli", "sample", "--recipe", str(recipe_file), "--out", str(tmp_path / "two-ranks"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    double = pngs(tmp_path / "two-ranks")
    settings = json.loads((tmp_path / "two-ranks" / "sampling.json").read_text())
    assert double == single
    assert settings["world_size"] == 2
    assert settings["complete"] is True


def test_rerun_regenerates_deleted_pngs_only(trained, tmp_path):
    _, recipe, _ = trained
    out = sample.run(recipe, out=tmp_path / "out")
    before = pngs(out)
    kept = {path.name: path.stat().st_mtime_ns for path in (out / "images").glob("*.png")}
    for index in (0, 5, 11):
        (out / "images" / f"{index:06d}.png").unlink()
        del kept[f"{index:06d}.png"]
    (out / "images" / "000007.png").write_bytes(b"")  # an empty file counts as missing

    sample.run(with_sample(recipe, batch_size=5), out=out)

    assert pngs(out) == before
    for name, mtime in kept.items():
        if name != "000007.png":
            assert (out / "images" / name).stat().st_mtime_ns == mtime, name


def test_missing_indices_lists_absent_and_empty(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "000000.png").write_bytes(b"x")
    (folder / "000002.png").write_bytes(b"")
    (folder / "grid.png").write_bytes(b"x")
    assert sample.missing_indices(tmp_path, 4) == [1, 2, 3]


def test_outputs_hold_exactly_n_samples(trained, tmp_path):
    _, recipe, _ = trained
    out = sample.run(with_sample(recipe, num_samples=7, batch_size=4), out=tmp_path / "out")
    with np.load(out / "samples.npz") as archive:
        images, labels = archive["arr_0"], archive["arr_1"]
    assert images.shape == (7, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.dtype == np.uint8
    assert labels.tolist() == [i % CLASSES for i in range(7)]
    assert len(pngs(out)) == 7
    for index in range(7):
        png = np.asarray(Image.open(out / "images" / f"{index:06d}.png"))
        assert np.array_equal(png, images[index]), index


def test_grid_tiles_classes_in_columns(trained, tmp_path):
    _, recipe, _ = trained
    out = sample.run(recipe, out=tmp_path / "out")
    grid = np.asarray(Image.open(out / "grid.png"))
    with np.load(out / "samples.npz") as archive:
        images = archive["arr_0"]
    border = 2
    assert grid.shape == (4 * (IMAGE_SIZE + border) + border, CLASSES * (IMAGE_SIZE + border) + border, 3)
    # Sample 4 (class 1) sits in row 1, column 1.
    top = left = border + IMAGE_SIZE + border
    assert np.array_equal(grid[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE], images[4])


def test_sampling_json_records_settings(trained, tmp_path):
    _, recipe, _ = trained
    changed = with_sample(recipe, sampler="heun", steps=3, cfg_scale=2.0)
    out = sample.run(changed, out=tmp_path / "out")
    settings = json.loads((out / "sampling.json").read_text())
    checkpoint = latest_checkpoint(RunPaths.of(recipe).generator)
    assert settings["sampler"] == "heun"
    assert settings["nfe"] == 5
    assert settings["guided_nfe"] == 5
    assert settings["guidance"] == [{"t_from": 1.0, "t_to": 0.0, "scale": 2.0}]
    assert settings["guidance_source"] == "null class"
    assert settings["seed"] == 0
    assert settings["num_samples"] == 12
    assert settings["labels"] == "balanced"
    assert settings["family"] == "diffusion"
    assert settings["checkpoint"]["weights"] == "ema"
    assert settings["checkpoint"]["hash"] == hashlib.sha256((checkpoint / "ema.safetensors").read_bytes()).hexdigest()[:16]
    assert settings["complete"] is True


def test_raw_weights_change_hash(trained, tmp_path):
    _, recipe, _ = trained
    out = sample.run(with_sample(recipe, use_ema=False, num_samples=2), out=tmp_path / "out")
    settings = json.loads((out / "sampling.json").read_text())
    checkpoint = latest_checkpoint(RunPaths.of(recipe).generator)
    assert settings["checkpoint"]["weights"] == "raw"
    assert settings["checkpoint"]["hash"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()[:16]


def test_flow_sampling_json_records_guidance(trained, tmp_path):
    root, _, flow_recipe = trained
    changed = with_sample(flow_recipe, cfg_scale=1.5, num_samples=4, flow_denoise_sigma=0.2)
    out = sample.run(changed, generator=root / "flow", out=tmp_path / "out")
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["family"] == "flow"
    assert settings["guidance"] == {"scale": 1.5, "form": "gaussian", "anneal": False}
    assert settings["denoise_sigma"] == 0.2


def test_rerun_with_other_seed_rejected(trained, tmp_path):
    _, recipe, _ = trained
    out = sample.run(with_sample(recipe, num_samples=2), out=tmp_path / "out")
    with pytest.raises(FaeError) as error:
        sample.run(with_sample(recipe, num_samples=2, seed=1), out=out)
    assert "seed: 0 there, 1 now" in str(error.value)


def test_fewer_samples_than_finished_rejected(trained, tmp_path):
    _, recipe, _ = trained
    out = sample.run(with_sample(recipe, num_samples=4), out=tmp_path / "out")
    npz_before = (out / "samples.npz").read_bytes()
    with pytest.raises(FaeError) as error:
        sample.run(with_sample(recipe, num_samples=2), out=out)
    assert str(error.value) == (
        f"{out} contains 4 finished samples, and sampling 2 would replace its samples.npz and grid.png with fewer; "
        "choose another output folder (--out), or sample 4 or more"
    )
    assert (out / "samples.npz").read_bytes() == npz_before
    sample.run(with_sample(recipe, num_samples=6), out=out)  # growing a finished folder is allowed
    with np.load(out / "samples.npz") as grown:
        assert len(grown["arr_0"]) == 6


def test_run_folder_keeps_manifest_count(trained, tmp_path):
    _, recipe, _ = trained
    out = sample.run(with_sample(recipe, num_samples=2), out=tmp_path / "out")
    write_manifest(out, "samples", recipe_hash="0" * 16, count=2)
    with pytest.raises(FaeError, match=r"contains the 2 samples of a `fae run` \(see its manifest.json\); write 3 samples to another folder with --out$"):
        sample.run(with_sample(recipe, num_samples=3), out=out)
    sample.run(with_sample(recipe, num_samples=2), out=out)  # the recorded count resumes as before


def test_flow_rejects_time_schedule(trained, tmp_path):
    root, _, flow_recipe = trained
    changed = flow_recipe.model_copy(deep=True)
    changed.sample.guidance = [
        {"t_from": 1.0, "t_to": 0.5, "scale": 2.0},
        {"t_from": 0.5, "t_to": 0.0, "scale": 1.0},
    ]
    with pytest.raises(FaeError) as error:
        sample.run(changed, generator=root / "flow", out=tmp_path / "out")
    assert "sample.cfg_scale" in str(error.value)


def test_random_labels_come_from_sample_generator():
    labels = sample_labels(3, range(50), 10, "random")
    again = sample_labels(3, [7, 49, 0], 10, "random")
    _, drawn, _ = draw_inputs(3, [7, 49, 0], (2, 2, 2), 10, "random")
    assert again.tolist() == [labels[7].item(), labels[49].item(), labels[0].item()]
    assert drawn.tolist() == again.tolist()
    assert len(set(labels.tolist())) > 5


def test_noise_depends_on_seed_and_index_only():
    noise, _, _ = draw_inputs(0, [3, 4, 5], (4, 2, 2), 3, "balanced")
    alone, _, _ = draw_inputs(0, [4], (4, 2, 2), 3, "balanced")
    other_seed, _, _ = draw_inputs(1, [4], (4, 2, 2), 3, "balanced")
    assert torch.equal(noise[1], alone[0])
    assert not torch.equal(alone, other_seed)


def test_to_uint8_rounds_endpoints_and_midpoint():
    # Pixel levels (x + 1) * 127.5 of 0.49, 0.51 and 127.49 round to the nearest integer.
    levels = torch.tensor([0.49, 0.51, 127.49])
    values = torch.cat([torch.tensor([-1.0, 1.0, 0.0, -2.0, 2.0]), levels / 127.5 - 1])
    images = values.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    pixels = to_uint8(images)
    assert pixels[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 0, 1, 127]
    assert pixels.shape == (1, 1, 8, 3)


def test_latents_bit_identical_across_batches(trained):
    # Float equality is stricter than equal PNGs: a batch of 2 without padding would run other
    # matrix-product kernels and change the last bits.
    _, recipe, flow_recipe = trained
    for path, settings in ((RunPaths.of(recipe).generator, recipe), (trained[0] / "flow", flow_recipe)):
        sampler = LatentSampler(load_generator(path), settings.sample)
        whole, _ = generate_latents(sampler, 0, list(range(6)), 6, "balanced")
        parts = [generate_latents(sampler, 0, list(range(start, min(start + 4, 6))), 4, "balanced")[0] for start in (0, 4)]
        assert torch.equal(torch.cat([parts[0], parts[1][:2]]), whole), path
