#!/usr/bin/env bash
# The first thing to run: prepare the bundled digits shards (once), then train configs/digits.toml with
# 2 processes on a CPU-only machine, or one process per GPU. Extra arguments go to train.py (--set ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "error: no $PY on PATH: activate the project's virtual env (source .venv/bin/activate)" \
    "or create it (python3 -m venv .venv && . .venv/bin/activate && pip install -e .)" >&2; exit 2; }
[ -f data/digits/manifest.json ] || "$PY" launch/prepare_data.py digits --out data/digits --resolution 32 --quiet
n=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$n" -ge 1 ] || n=2
multi=""
[ "$n" -gt 1 ] && multi="--multi_gpu"
exec "$PY" launch/run.py $multi --num_processes "$n" --num_machines 1 --mixed_precision no \
    --dynamo_backend no launch/train.py --config configs/digits.toml "$@"
