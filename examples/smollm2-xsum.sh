#!/usr/bin/env bash
# Fine-tune a real pretrained model (SmolLM2-135M-Instruct, GGUF) on real XSUM rows, offline,
# then compare it with its own zero-shot summaries on the test rows and plot the loss curve.
#
#   bash examples/smollm2-xsum.sh                       # GPU: 4-bit QLoRA
#   EXTRA="--quantization none" bash examples/smollm2-xsum.sh   # CPU: full precision, slow
#
# The settings differ from phi-2's defaults where a 135 M model needs it (see docs/RESULTS.md):
# learning rate 1e-3 instead of 2e-4, LoRA on every linear layer, 2 epochs. phi2 train takes such
# values from its table by model size (phi2cli/models/recipes.py) when no flag is given; the flags
# below pin the first of them, and the table adds the rest (base kept in bf16, NEFTune noise, no
# compiling in a run this short, and summaries picked among the greedy one and 32 samples by
# minimum Bayes risk, which evaluate and summarize then use), printed at the start of the run.
set -euo pipefail
MODEL=${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-../shared/data/xsum}
RUN=${RUN:-runs/smollm2}
EXTRA=${EXTRA:-}

# shellcheck disable=SC2086
phi2 train --model "$MODEL" --template chat --data-dir "$DATA" --samples 1495 --val-samples 500 \
    --lr 1e-3 --lora-targets all-linear --epochs 2 --warmup-steps 20 --eval-every 100 \
    --output-dir "$RUN/finetuned" --final-dir "$RUN/final" --overwrite $EXTRA
phi2 evaluate --adapter "$RUN/final" --split test --samples 500 --compare-base --data-dir "$DATA"
phi2 report "$RUN/finetuned" --plot "$RUN/loss.png"
