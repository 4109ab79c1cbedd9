#!/usr/bin/env bash
# The one GPU check: everything a session lent a GPU runs, in one device call, end to end.
#
#   bash tests/gpu/fetch_wheels.sh          # here, with PyPI: the wheels the GPU image lacks, into .whl/, and
#                                           # Fashion-MNIST's IDX files with its feature classifier, into .fashion/
#   device run: carry [".whl", ".fashion"], timeout_s 580, command "bash tests/gpu/run.sh"
#
# Sections, in order, each bounded by `timeout` and written under $OUT as soon as it ends (a timeout still
# returns the earlier ones); budgets in seconds, 560 s in all on an H200 (the limit per command is 600):
#   install 30   the carried wheels (.whl/) into /tmp/site, when there are any
#   setup   20   record the device and the versions (env.json)
#   pytest 150   python -m pytest -m gpu tests/gpu (CUDA correctness)
#   bench  200   launch/bench.py train: 64 px x batch 128/256/512 x fp32/bf16/fp16 x channels_last x
#                eager/CUDA graph; 32 and 128 px; torch.compile; the textbook loop; FLOPs and peak fraction
#   e2e     70   launch/run.py + train.py on generated 64-px shards on local disk, W&B offline
#   fashion 90   Fashion-MNIST: configs/fashion.toml for 20 epochs in bf16, then FID/precision/recall of 10,000
#                images against the 10,000 test images, and the floor (tests/gpu/fashion.py)
# then a summary (summary.md, summary.json). Files under $OUT (8 at most come back): env.json, sections.jsonl,
# log.txt, bench.json, e2e.json, fashion.json, summary.md, summary.json.
# Without CUDA it is a rehearsal: the same sections at tiny sizes, CUDA-only tests skipped, the report written
# under $OUT or build/gpu-rehearsal/ (tests/test_gpu_rehearsal.py runs it in the suite).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/gpu-rehearsal}
mkdir -p "$OUT"
rm -f "$OUT"/sections.jsonl "$OUT"/log.txt "$OUT"/bench.json "$OUT"/e2e.json "$OUT"/fashion.json "$OUT"/summary.*
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

section() {   # section NAME BUDGET_S 'COMMANDS': run them bounded (bash -c), append the log, record the outcome
    local name=$1 budget=$2 t0=$SECONDS rc
    echo "=== $name (budget ${budget} s): $3" >> "$OUT/log.txt"
    timeout --kill-after=10 "$budget" bash -c "$3" >> "$OUT/log.txt" 2>&1
    rc=$?
    printf '{"section": "%s", "rc": %d, "seconds": %d, "budget_s": %d, "timed_out": %s}\n' "$name" "$rc" \
        $((SECONDS - t0)) "$budget" "$([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)" >> "$OUT/sections.jsonl"
}
export OUT PY

SITE=""
# the wheels are built for the GPU machine's Python 3.12; a rehearsal elsewhere uses the environment it runs in
if ls .whl/*.whl >/dev/null 2>&1 && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    SITE=/tmp/site
    section install 30 '"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl'
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi
section setup 20 '"$PY" tests/gpu/summarize.py --env "$OUT/env.json"'
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)

section pytest 150 '"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/gpu'

B='"$PY" launch/bench.py train --json "$OUT/bench.json"'
if [ "$CUDA" = 1 ]; then
    section bench 180 "$B --resolutions 64 --batch-sizes 128,256,512 --precisions fp32,bf16,fp16 --channels-last on,off \
        --modes eager,graph --steps 30 --warmup 5 --workers 8 &&
      $B --resolutions 32,128 --batch-sizes 256 --precisions bf16 --channels-last on --modes eager,graph --steps 30 \
        --warmup 5 --no-shards-row &&
      $B --resolutions 64 --batch-sizes 256 --precisions bf16 --channels-last on --modes compile --steps 30 --warmup 5 \
        --no-shards-row"
    E2E="--resolution 64 --images 50000 --batch-size 256 --steps 600 --workers 8 --precision bf16"
    FASHION="--epochs 20 --batch-size 256 --workers 6 --precision bf16 --n 10000"
else
    section bench 200 "$B --resolutions 32 --batch-sizes 8 --precisions fp32 --channels-last on --modes eager,graph \
        --steps 1 --warmup 1 --no-shards-row"
    E2E="--resolution 32 --images 512 --batch-size 16 --steps 6 --workers 1 --precision fp32"
    FASHION="--epochs 1 --limit 1024 --batch-size 128 --workers 1 --precision fp32 --n 256"
fi
section e2e 70 "\"\$PY\" tests/gpu/e2e.py --work \"$WORK\" --json \"\$OUT/e2e.json\" $E2E"
# the IDX files (and the feature classifier trained on them, when fetch_wheels.sh put it there) travel in .fashion/
IDX=.fashion; [ -f "$IDX/train-images-idx3-ubyte.gz" ] || IDX=/usr/share/datasets/fashion-mnist
CACHE=""; [ -d .fashion/cache ] && CACHE="--cache .fashion/cache"
section fashion 90 "\"\$PY\" tests/gpu/fashion.py --idx $IDX --work \"$WORK/fashion\" --json \"\$OUT/fashion.json\" $CACHE $FASHION"
"$PY" tests/gpu/summarize.py "$OUT"
