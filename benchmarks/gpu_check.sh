#!/usr/bin/env bash
# One prepared GPU check for a single H200 (or any CUDA GPU), at most about 8 minutes:
# LightningDiT-XL/1 on random 16x16x32 latents, bf16, with torch.compile off and on:
# training throughput (images/s), Euler sampling throughput, FLOP/s against the measured bf16
# matmul rate, and peak memory. Prints one summary table; the raw figures go to $OUT (or /tmp).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, fae installed
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/fae-gpu-check}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || echo "nvidia-smi not found"

timeout 200 "$python" benchmarks/dit_step.py --device cuda --batch 64 --iters 20 --sample-steps 50 \
  --json "$out/eager.json" > "$out/eager.log" 2>&1 || echo "eager run failed: see $out/eager.log"
timeout 260 "$python" benchmarks/dit_step.py --device cuda --batch 64 --iters 20 --sample-steps 50 --compile \
  --json "$out/compiled.json" > "$out/compiled.log" 2>&1 || echo "compiled run failed: see $out/compiled.log"

"$python" - "$out" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [
    ("train images/s", "train_images_per_s", "{:.0f}"),
    ("training step ms", "training_step_ms", "{:.1f}"),
    ("bare / trainer step", "bare_over_step", "{:.3f}"),
    ("achieved TFLOP/s", "achieved_tflops", "{:.0f}"),
    ("matmul TFLOP/s (bf16)", "matmul_tflops", "{:.0f}"),
    ("achieved / matmul", "achieved_over_matmul", "{:.2f}"),
    ("sample images/s (Euler 50)", "sample_images_per_s", "{:.0f}"),
    ("NFE x forward / sampling", "nfe_forward_over_sample", "{:.3f}"),
    ("peak memory GiB", "peak_memory_gib", "{:.1f}"),
]
runs = {}
for name in ("eager", "compiled"):
    path = out / f"{name}.json"
    runs[name] = json.loads(path.read_text()) if path.is_file() else None
print(f"\n{'LightningDiT-XL/1, 16x16x32, batch 64, bf16':<46} {'compile off':>12} {'compile on':>12}")
for label, key, fmt in rows:
    cells = []
    for name in ("eager", "compiled"):
        run = runs[name]
        value = None if run is None else run.get(key)
        cells.append("failed" if run is None else ("n/a" if value is None else fmt.format(value)))
    print(f"{label:<46} {cells[0]:>12} {cells[1]:>12}")
PY
