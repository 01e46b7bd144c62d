#!/usr/bin/env bash
# The main job, end to end, offline: make the synthetic shapes dataset, train
# Mask R-CNN (boxes, masks, keypoints) on it, evaluate with COCOeval, and draw
# predictions for a few validation images.
#
#   scripts/demo.sh [--config.x=y ...]     (extra flags go to train/evaluate/predict)
#
# About 13.5 minutes on a 2-core CPU from a fresh clone, venv install included
# (805 and 799 s at 0.359 and 0.356 s/step, two runs; the step's speed varies
# by ~10% from one hour to the next, i.e. +-35 s over the 1900 steps).
# Reruns reuse the dataset and resume (or skip) training. DATA and WORKDIR
# override where things go (default data/shapes and workdirs/shapes).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
source scripts/venv.sh requirements.txt

data="${DATA:-data/shapes}"
workdir="${WORKDIR:-workdirs/shapes}"
config=configs/shapes.py
flags=(--config.data.train_dir="$data/tf/train" --config.data.eval_dir="$data/tf/val" "$@")

# JAX's persistent compilation cache: training's two programs are compiled into
# it on one core while the other makes the dataset (a first run gains only a few
# seconds: compiling, ~35 s, outlasts the data, ~20 s), and reruns load every
# program compiled before.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(dirname "$workdir")/jax_cache}"
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
"$PY" -m mrcnn_jax.train --config="$config" --workdir="$workdir" --compile_only "${flags[@]}" \
  > "$JAX_COMPILATION_CACHE_DIR/compile_only.log" 2>&1 &
compile_ahead=$!
trap 'kill "$compile_ahead" 2>/dev/null || true' EXIT  # if the data step fails

# Objects of at least 16 px: at 128 px the default's smallest are 4-px diamonds
# that no model tells from ellipses (see configs/shapes.py).
generate=(--train 2000 --val 200 --size 128 --min_object_size 16 --seed 0)
if [[ "$(cat "$data/generated_with" 2>/dev/null)" != "${generate[*]}" ]]; then
  if [[ -e "$data" ]] && ! grep -qs "mrcnn_jax synthetic shapes" "$data/annotations/instances_val.json"; then
    echo "error: $data exists and is not a synthetic dataset made by this script; set DATA" >&2
    exit 1
  fi
  echo "== generating the synthetic dataset in $data"
  rm -rf "$data"
  "$PY" -m mrcnn_jax.data.synthetic --output "$data" "${generate[@]}"
  echo "${generate[*]}" > "$data/generated_with"
  if [[ -e "$workdir" ]]; then  # trained on other data: keep it, but do not resume it
    old="$workdir.$(date +%Y%m%d-%H%M%S)"
    echo "== new dataset: moving the old $workdir to $old"
    mv "$workdir" "$old"
  fi
fi
for split in train val; do
  if [[ ! -f "$data/tf/$split/index.json" ]]; then
    echo "== converting $split to TFRecords"
    "$PY" -m mrcnn_jax.data.coco --images "$data/$split" \
      --annotations "$data/annotations/instances_$split.json" --output "$data/tf/$split" --shards 4
  fi
done

wait "$compile_ahead" || echo "(compiling ahead failed: training compiles for itself;" \
  "see $JAX_COMPILATION_CACHE_DIR/compile_only.log)"
echo "== training (progress bar, metric lines; TensorBoard: $workdir/tensorboard)"
"$PY" -m mrcnn_jax.train --config="$config" --workdir="$workdir" "${flags[@]}"

# Evaluation and the pictures run side by side: each spends much of its time
# compiling on one core, so together they take ~12 s less than one after the other.
echo "== evaluating on the validation split; drawing predictions for a few of its images"
inputs="$workdir/predict_inputs"
rm -rf "$inputs" && mkdir -p "$inputs"
for f in $(ls "$data/val" | head -n 8); do cp "$data/val/$f" "$inputs/"; done
"$PY" -m mrcnn_jax.predict --config="$config" --checkpoint="$workdir" --input="$inputs" \
  --output="$workdir/pictures" "${flags[@]}" > "$workdir/predict.log" 2>&1 &
predict=$!
"$PY" -m mrcnn_jax.evaluate --config="$config" --workdir="$workdir" "${flags[@]}" \
  > "$workdir/eval.log" 2>&1 || { cat "$workdir/eval.log"; kill "$predict"; exit 1; }
grep -A 12 "COCOeval" "$workdir/eval.log" | grep -v "^I[0-9]" || true
wait "$predict" || { cat "$workdir/predict.log"; exit 1; }

"$PY" - "$workdir/eval_metrics.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
print("\n== results (COCO AP on the synthetic validation split)")
for kind in ("bbox", "segm", "keypoints"):
  row = "  ".join(f"{k.split('/')[1]} {m[k]:.3f}" for k in
                  (f"{kind}/AP", f"{kind}/AP50", f"{kind}/AP75") if m.get(k) is not None)
  print(f"  {kind:9s} {row}")
PYEOF
echo "pictures:    $workdir/pictures/*.png"
echo "predictions: $workdir/pictures/predictions.json"
echo "metrics:     $workdir/eval_metrics.json, $workdir/metrics.jsonl"
echo "total time:  $(( $(date +%s) - start )) s"
