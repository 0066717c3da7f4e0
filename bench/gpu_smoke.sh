#!/usr/bin/env bash
# GPU smoke run: SmolLM2-135M on one CUDA device, bfloat16 end to end.
#   1. compression: the main job's recipe (parallel_pruned, 30 -> 21 layers) with `validate`
#   2. a short heal of the export: `fit` for a few steps (no merge left to do)
#   3. nf4 quantization of the export (bitsandbytes on the GPU), evaluated
# Prints each step's wall time and metrics. Without a CUDA device it prints one line saying so and exits 0.
#
#   bash bench/gpu_smoke.sh                 # PYTHON=.venv/bin/python OUT=<dir> STEPS=20 to change the defaults
#
# Needs a CUDA build of torch and a bitsandbytes with CUDA kernels in that environment (the CPU wheels of `make install`
# have neither), and the SmolLM2 asset (`lightning-mka-assets fetch`). Outputs go to $OUT (a new temp dir by default).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
STEPS="${STEPS:-18}"
ACCELERATOR="${SMOKE_ACCELERATOR:-gpu}"   # SMOKE_ACCELERATOR=cpu runs the same steps on the CPU (to check the script)
read -r -a EXTRA <<< "${SMOKE_ARGS:-}"      # appended to every command, e.g. SMOKE_ARGS="--data.eval_samples 2" for a short check

if [ "$ACCELERATOR" = gpu ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_smoke: no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing run"
  exit 0
fi
now_ms() { date +%s%3N; }
seconds_since() { echo "$(( $(now_ms) - $1 ))" | awk '{printf "%.1f", $1 / 1000}'; }

OUT="${OUT:-$(mktemp -d -t mka-gpu-smoke-XXXXXX)}"
mkdir -p "$OUT"
cd "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF'
import torch, lightning, transformers
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
print(f"gpu_smoke: {device}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"lightning {lightning.__version__}, transformers {transformers.__version__}")
EOF

# 1. Compression: the main job's config with its outputs redirected here.
sed -e "s#export_dir: exports/#export_dir: $OUT/exports/#" "$REPO/configs/smollm2-135m-mka.yaml" > compress.yaml
tick=$(now_ms)
"$PY" -m lightning_mka.cli validate --config compress.yaml --model.dtype bfloat16 --trainer.accelerator $ACCELERATOR --trainer.devices 1 \
  --trainer.logger.init_args.save_dir "$OUT/runs" "${EXTRA[@]}" > compress.log 2>&1 || { tail -20 compress.log; exit 1; }
compress_s=$(seconds_since "$tick")
EXPORT="$OUT/exports/smollm2-135m-mka-21L"
"$PY" - "$OUT/runs" "$compress_s" <<'EOF'
import json, sys
from pathlib import Path
r = json.loads(sorted(Path(sys.argv[1]).glob("*/version_*/results.json"))[-1].read_text())
ppl = lambda m: ", ".join(f"{k.split('/')[-1]}={v:.2f}" for k, v in m.items() if k.endswith("_ppl"))
print(f"gpu_smoke: compression {r['layers_before']} -> {r['layers_after']} layers (parallel_pruned, bf16): wall {float(sys.argv[2]):.1f} s "
      f"(compression {r['compression_seconds']} s, first pass {r['first_pass_seconds']} s), peak GPU {r.get('peak_device_mb', 'n/a')} MB, "
      f"peak RSS {r['peak_rss_mb']} MB")
print(f"gpu_smoke:   before: {ppl(r['metrics_before'])}, MMLU letter {r['metrics_before'].get('mmlu_letter_acc', float('nan')):.3f}")
print(f"gpu_smoke:   after:  {ppl(r['metrics_after'])}, MMLU letter {r['metrics_after'].get('mmlu_letter_acc', float('nan')):.3f}")
EOF

# 2. A short heal of the export (no merge left: no MergeCallback), validation before and after.
tick=$(now_ms)
"$PY" -m lightning_mka.cli fit --config "$REPO/configs/smollm2-135m-mka-heal.yaml" --model.model "$EXPORT" --model.dtype bfloat16 \
  --trainer.accelerator $ACCELERATOR --trainer.devices 1 --trainer.callbacks null --trainer.enable_checkpointing false \
  --trainer.max_steps "$STEPS" --trainer.log_every_n_steps 1 --trainer.logger lightning.pytorch.loggers.CSVLogger \
  --trainer.logger.save_dir "$OUT/heal" "${EXTRA[@]}" > heal.log 2>&1 || { tail -20 heal.log; exit 1; }
heal_s=$(seconds_since "$tick")
"$PY" - "$OUT/heal" "$heal_s" "$STEPS" <<'EOF'
import csv, sys
from pathlib import Path
rows = list(csv.DictReader(open(sorted(Path(sys.argv[1]).glob("**/metrics.csv"))[-1])))
loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
val = [{k: float(v) for k, v in r.items() if k.startswith("val/") and k.endswith("_ppl") and v} for r in rows]
val = [v for v in val if v]
print(f"gpu_smoke: heal {sys.argv[3]} steps (bf16, AdamW): wall {float(sys.argv[2]):.1f} s, train loss {loss[0]:.3f} -> {loss[-1]:.3f}" if loss else
      f"gpu_smoke: heal: wall {float(sys.argv[2]):.1f} s, no train loss logged")
if val:
    print("gpu_smoke:   validation after: " + ", ".join(f"{k.split('/')[-1]}={v:.2f}" for k, v in val[-1].items()))
EOF

# 3. nf4 of the compressed export on the GPU, evaluated on the same held-out text.
cat > quantize.yaml <<EOF
trainer:
  callbacks:
    - class_path: lightning_mka.callbacks.QuantizeCallback
      init_args:
        modes: [nf4]
        export_dir: $OUT/exports/smollm2-135m-mka-21L-nf4
        overwrite: true
data:
  eval_texts: [wiki, lee]
  eval_samples: 16
  mmlu_per_topic: 0
EOF
tick=$(now_ms)
"$PY" -m lightning_mka.cli validate --config quantize.yaml --model.model "$EXPORT" --model.dtype bfloat16 --trainer.accelerator $ACCELERATOR \
  --trainer.devices 1 --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name quantize "${EXTRA[@]}" > quantize.log 2>&1 \
  || { tail -20 quantize.log; exit 1; }
quantize_s=$(seconds_since "$tick")
"$PY" - "$OUT/runs/quantize" "$quantize_s" <<'EOF'
import json, sys
from pathlib import Path
q = json.loads(sorted(Path(sys.argv[1]).glob("version_*/quantization.json"))[-1].read_text())
ppl = lambda m: ", ".join(f"{k}={v:.2f}" for k, v in m.items() if k.endswith("_ppl"))
n = q["nf4"]
print(f"gpu_smoke: nf4: wall {float(sys.argv[2]):.1f} s (load {n['load_seconds']} s, eval {n.get('eval_seconds')} s), "
      f"{n['bytes_in_memory'] / 1e6:.1f} MB in memory vs {q['float']['bytes_in_memory'] / 1e6:.1f} MB bf16")
print(f"gpu_smoke:   bf16: {ppl(q['float']['metrics'])}")
print(f"gpu_smoke:   nf4:  {ppl(n.get('metrics', {}))}")
EOF
echo "gpu_smoke: done; outputs in $OUT"
