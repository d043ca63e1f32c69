#!/bin/bash
# Sample quality of a small diffusion and a small flow generator on the embedded Fashion-MNIST
# default, on CPU: sample grids and FID against the 1,000 held-out test images.
#
# Usage: bash benchmarks/generator_quality.sh [WORKDIR]   (default /tmp/fae-generator-quality)
# Every stage runs with one thread. The figures in docs/benchmarks.md came from these commands on
# a shared 2-core machine; there the whole script takes about two hours, most of it Inception.
set -euo pipefail
WORK=${1:-/tmp/fae-generator-quality}
mkdir -p "$WORK"
cd "$WORK"
export OMP_NUM_THREADS=1
RUN=runs/fmnist

cat > recipe.toml <<'TOML'
[run]
name = "fmnist"
out_dir = "runs"
device = "cpu"

[data]
image_size = 128

[encoder]
input_size = 128

[adapter]
latent_channels = 8
decoder_layers = 2
holdout = 500

[adapter.train]
steps = 600
batch_size = 64
learning_rate = 0.001
warmup_steps = 50
ema_decay = 0.99
log_every = 50
checkpoint_every = 200

[decoder]
size = "custom"
layers = 4
width = 256
heads = 4
perceptual_weight = 0.0
gan_weight = 0.0
finetune = false

[decoder.train]
steps = 400
batch_size = 16
learning_rate = 0.0005
warmup_steps = 40
ema_decay = 0.99
log_every = 20
checkpoint_every = 100

[generator]
model = "LightningDiT-debug/1"
num_classes = 10

[generator.train]
steps = 2500
batch_size = 64
learning_rate = 0.001
ema_decay = 0.999
log_every = 100
checkpoint_every = 500
keep_checkpoints = 10
eval_every = 1250

[sample]
num_samples = 1000
batch_size = 100
sampler = "euler"
steps = 50
cfg_scale = 1.5
TOML

FLOW=(--set "generator.family='flow'" --set "generator.model='STARFlow-debug'" --set generator.train.steps=1800
      --set generator.train.warmup_steps=100 --set generator.train.checkpoint_every=600 --set generator.train.eval_every=900)

# Features, adapter, pixel decoder and latents.
fae extract --recipe recipe.toml
fae train-adapter --recipe recipe.toml
fae train-decoders --recipe recipe.toml --phase noise
fae extract --recipe recipe.toml --latents $RUN/adapter

# Generators (each run is timed) and 1,000 class-balanced samples per checkpoint.
time fae train-generator --recipe recipe.toml
time fae train-generator --recipe recipe.toml "${FLOW[@]}" --out $RUN/generator-flow
# EMA weights (the default) and raw weights (--set sample.use_ema=false).
for weights in ema raw; do
  RAW=(); [ $weights = raw ] && RAW=(--set sample.use_ema=false)
  fae sample --recipe recipe.toml "${RAW[@]}" --generator $RUN/generator/checkpoints/step-00001000 --out samples-diffusion-1000-$weights
  fae sample --recipe recipe.toml "${RAW[@]}" --generator $RUN/generator --out samples-diffusion-2500-$weights
  fae sample --recipe recipe.toml "${RAW[@]}" --generator $RUN/generator-flow --out samples-flow-1800-$weights
done

# References: the held-out images and their Inception statistics, 1,000 class-balanced
# training images (real against real), and 1,000 decoded training latents (the decoder's floor).
python - <<'PY'
import numpy as np
import torch

from fae_cli.data.cache import open_cache
from fae_cli.data.datasets import open_images
from fae_cli.evaluation.fid import extract_features
from fae_cli.evaluation.fid_inputs import open_input
from fae_cli.evaluation.frechet import GaussianStats
from fae_cli.evaluation.inception import InceptionFeatures, resolve_weights
from fae_cli.recipe import load_recipe
from fae_cli.stages.adapter import load_adapter
from fae_cli.stages.decoders import load_pixel_decoder
from fae_cli.stages.generation import ImageDecoder, to_uint8

torch.set_num_threads(1)
recipe = load_recipe("recipe.toml")
run = "runs/fmnist"


def save_images(path, dataset, indices):
    images = np.stack([dataset[int(i)][0].permute(1, 2, 0).numpy() for i in indices])
    np.savez(path, arr_0=images, arr_1=np.array([dataset[int(i)][1] for i in indices]))


holdout = open_images(recipe.data, "holdout")
save_images("holdout.npz", holdout, range(len(holdout)))
train = open_images(recipe.data, "train")
save_images("train-1000.npz", train, np.concatenate([np.nonzero(train.labels == c)[0][:100] for c in range(10)]))

cache = open_cache(f"{run}/latents", kind="latents")
rows = torch.cat([torch.nonzero(cache.labels == c).reshape(-1)[:100] for c in range(10)])
decoder = ImageDecoder(load_adapter(f"{run}/adapter")[0], load_pixel_decoder(f"{run}/decoder-noise")[0])
decoded = np.concatenate([to_uint8(decoder(cache.get(rows[i : i + 100]))) for i in range(0, len(rows), 100)])
np.savez("decoded-train-1000.npz", arr_0=decoded, arr_1=cache.labels[rows].numpy())

network = InceptionFeatures(resolve_weights(None, need_logits=False), device="cpu")
for name in ("holdout", "decoded-train-1000"):
    features = extract_features(network, open_input(f"{name}.npz", role="reference").images, 64, name)
    stats = GaussianStats.from_features(features["pool"])
    np.savez(f"{name}-stats.npz", mu=stats.mu, sigma=stats.sigma)
PY

# Against the held-out images, and against decoded training latents: the second reference went
# through the same adapter and pixel decoder as the samples, so it leaves out the decoder's error.
while read -r name samples reference; do
  echo "== $name against $reference"
  fae evaluate fid "$samples" $reference-stats.npz --set "run.device='cpu'" --out "fid/$name-vs-$reference"
done <<'LIST'
real-train train-1000.npz holdout
real-train train-1000.npz decoded-train-1000
decoded-train decoded-train-1000.npz holdout
LIST
for weights in ema raw; do
  for run in diffusion-1000 diffusion-2500 flow-1800; do
    for reference in holdout decoded-train-1000; do
      fae evaluate fid samples-$run-$weights/samples.npz $reference-stats.npz --set "run.device='cpu'" --out "fid/$run-$weights-vs-$reference"
    done
  done
done
