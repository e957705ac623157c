#!/usr/bin/env bash
# The whole pipeline offline on a CPU in about a minute: a tiny random-weight Phi model with
# phi-2's real tokenizer, 200 real XSUM rows. The summaries are noise (random weights); every
# command, file and table is the real thing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${WORK:-runs/tryout}
mkdir -p "$WORK"
cd "$WORK"
python "$ROOT/examples/make_tiny_model.py" tiny-phi-2
phi2 prepare --data-dir "$ROOT/examples/data/xsum-sample" --model tiny-phi-2 --samples 200 --val-samples 40 --max-length 512 \
    --overwrite
phi2 train --prepared phi2-xsum-prepared --model tiny-phi-2 --max-steps 10 --eval-every 5 \
    --logging-steps 2 --warmup-steps 0 --lr 1e-3 --overwrite
phi2 evaluate --samples 16 --max-new-tokens 20 --compare-base
phi2 summarize "$ROOT/examples/article.txt" --max-new-tokens 20
phi2 report --every 2
phi2 report --format markdown --plot loss.png > report.md
phi2 export --dtype float32 --overwrite
echo "Try-out done: see $WORK (phi2-xsum-finetuned, phi2-xsum-final, phi2-xsum-merged, report.md, loss.png)"
