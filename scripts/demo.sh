#!/usr/bin/env bash
# The whole pipeline on a real small model that refuses, on the CPU, from a fresh clone:
# gemma-3-270m (from the PyPI GGUF package) taught to refuse (built once, 10-30 min, cached)
# -> measure -> analyze -> ablate -> verify -> evaluate -> tune -> ablate -> evaluate
# -> publish --dry-run.
# Usage: scripts/demo.sh [OUT_DIR]   (default: demo-out)
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
MODEL="$OUT/gemma-3-270m-refusing"
step() { printf '\n== %s\n' "$*"; }

step "1/7 the refusing model: gemma-3-270m taught to refuse the built-in harmful measure prompts"
echo "(LoRA merged into the weights, trained on the measure split only; the held-out split below"
echo " is never trained on. First run: 10-30 minutes on 2 cores, then cached.)"
[ -f "$MODEL/config.json" ] || ablation demo-model --refusing "$MODEL" -q

step "2/7 measure: built-in harmful and harmless prompts -> $OUT/gemma.refuse"
python measure.py --model "$MODEL" -o "$OUT/gemma.refuse" --batch-size 32 -q

step "3/7 analyze: rank layers, draw them, write starting orders (no hand edits below)"
python analyze.py "$OUT/gemma.refuse" --chart "$OUT/layers.png" --json "$OUT/layers.json" \
  --emit-orders "$OUT/orders.yaml" --model "$MODEL" --output "$OUT/gemma-3-270m-abliterated"
grep -v '^#' "$OUT/orders.yaml"

step "4/7 ablate: stream the shards through the edits"
python sharded_ablate.py "$OUT/orders.yaml" --overwrite --base-model google/gemma-3-270m -q

step "5/7 verify: edits took, every other byte identical"
ablation verify "$OUT/gemma-3-270m-abliterated" --orders "$OUT/orders.yaml" -q

step "6/7 evaluate: held-out prompts, base vs ablated"
ablation evaluate --base "$MODEL" --ablated "$OUT/gemma-3-270m-abliterated" \
  --max-new-tokens 24 --batch-size 32 -q

step "side by side: held-out harmful prompts, base vs ablated (first 4)"
python - "$OUT/gemma-3-270m-abliterated/eval_responses.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
harm = {}
for r in rows:
    if r["set"] == "harmful":
        harm.setdefault(r["prompt"], {})[r["model"]] = r["response"].replace("\n", " ")[:70]
for prompt, sides in list(harm.items())[:4]:
    print(f"prompt : {prompt}\n  base   : {sides['base']}\n  ablated: {sides['ablated']}")
PY

step "7/7 tune: search the orders on the loaded model (tuning split), then stream them out"
echo "(the held-out prompts above are never used by the search; 30 trials or 4 minutes of"
echo " trials, whichever comes first, ~40 s a trial on 2 cores; analyze's orders are tried first)"
ablation tune --model "$MODEL" --measurements "$OUT/gemma.refuse" -o "$OUT/tune" \
  --trials 30 --timeout 240 --batch-size 32 --target "$OUT/gemma-3-270m-tuned" --no-held-out -q
python sharded_ablate.py "$OUT/tune/orders.yaml" --overwrite --base-model google/gemma-3-270m -q
ablation evaluate --base "$MODEL" --ablated "$OUT/gemma-3-270m-tuned" \
  --max-new-tokens 24 --batch-size 32 -q

step "publish (dry run: shows the files and the model card, sends nothing)"
ablation publish "$OUT/gemma-3-270m-abliterated" --repo-id you/gemma-3-270m-abliterated \
  --dry-run -q | tail -n 22

step "artifacts"
cat <<EOT
model        $MODEL
measurement  $OUT/gemma.refuse
analysis     $OUT/layers.png  $OUT/layers.json
orders       $OUT/orders.yaml  (analyze)   $OUT/tune/orders.yaml  (tune: front.png, front.json)
tuned        $OUT/gemma-3-270m-tuned  (eval.json)
abliterated  $OUT/gemma-3-270m-abliterated  (ablation.json, README.md model card)
evaluation   $OUT/gemma-3-270m-abliterated/eval.json  eval_responses.jsonl
EOT
