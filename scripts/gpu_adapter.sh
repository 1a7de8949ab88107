#!/usr/bin/env bash
# Tunes the NER adapters on a lent GPU machine (never needed by tests or CI). One call carries at most 64 MiB, so
# the base GGUF travels gzip-ed in four pieces (training/adapter/stash/<i>/part, made by `spacy project run
# adapter-stash`), one per call, each copied to /tmp/stash (which survives between calls while the machine is warm):
#   bash scripts/gpu_adapter.sh stash 0   ... stash 2      (carry training/adapter/stash/<i>, training/adapter/wheels)
#   bash scripts/gpu_adapter.sh tune                       (carry stash/3, the .npz token files and the wheels)
# `tune` joins and checks the model, then trains four adapters at once on the one GPU: ner-v1 (the shipped one),
# leave-one-domain-out without politics and without science, and the local CoNLL-including variant; all under $OUT.
#   bash scripts/gpu_adapter.sh data                       (carry training/adapter/ner-v1.npz, conll.npz)
#   bash scripts/gpu_adapter.sh tune2                      (carry stash/3 only: with the repository's own files,
#                                                           stash/3 and the token files exceed one call's 64 MiB)
# `tune2` trains two adapters with schedules short enough to finish (the learning rate anneals): ner-v2, a candidate
# successor of ner-v1 on the same data, and ner-conll; it brings back exactly eight files (a call returns at most
# eight): per adapter the final LoRA's safetensors and config, tuning.json and the log.
set -euo pipefail
PY=$(command -v python || command -v python3)
mkdir -p /tmp/stash /tmp/pylib
join_model() {  # the last piece, the whole GGUF checked, the wheels (if carried) installed
  cp training/adapter/stash/3/part /tmp/stash/part-3
  cat /tmp/stash/part-0 /tmp/stash/part-1 /tmp/stash/part-2 /tmp/stash/part-3 | gunzip > /tmp/stash/model.gguf
  echo "9ee864697367f9b6839112968febaba2  /tmp/stash/model.gguf" | md5sum -c
  "$PY" -m pip install -q --no-deps --target /tmp/pylib training/adapter/wheels/*.whl 2>&1 | tail -2 || true
  export PYTHONPATH=/tmp/pylib
}
case "$1" in
stash)
  cp "training/adapter/stash/$2/part" "/tmp/stash/part-$2"
  "$PY" -m pip install -q --no-deps --target /tmp/pylib training/adapter/wheels/*.whl 2>&1 | tail -2 || true
  ls -la /tmp/stash; "$PY" --version; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  PYTHONPATH=/tmp/pylib "$PY" -c "import torch, transformers, peft, gguf, safetensors; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.is_available())"
  ;;
tune)
  join_model
  common=(--model /tmp/stash/model.gguf --epochs "${EPOCHS:-1.5}" --bf16 --expect-loss 0.7932 --max-minutes "${MINUTES:-5.5}")
  d=training/adapter
  "$PY" scripts/tune_adapter.py "${common[@]}" --data $d/ner-v1.npz --out "$OUT/ner-v1" --checkpoints 0.33,0.67,1.0 > "$OUT/ner-v1.log" 2>&1 &
  "$PY" scripts/tune_adapter.py "${common[@]}" --data $d/ner-v1.npz --exclude politics --out "$OUT/loo-politics" --checkpoints 0.67,1.0 > "$OUT/loo-politics.log" 2>&1 &
  "$PY" scripts/tune_adapter.py "${common[@]}" --data $d/ner-v1.npz --exclude science --out "$OUT/loo-science" --checkpoints 0.67,1.0 > "$OUT/loo-science.log" 2>&1 &
  "$PY" scripts/tune_adapter.py "${common[@]}" --data $d/ner-v1.npz $d/conll.npz --out "$OUT/ner-conll" --checkpoints 0.67,1.0 > "$OUT/ner-conll.log" 2>&1 &
  sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -n 3 "$OUT"/*.log
  wait
  tail -n 4 "$OUT"/*.log
  ;;
data)
  mkdir -p /tmp/stash/npz && cp training/adapter/*.npz /tmp/stash/npz/ && ls -la /tmp/stash/npz
  ;;
tune2)
  join_model
  mkdir -p training/adapter && cp -n /tmp/stash/npz/*.npz training/adapter/ 2>/dev/null || true
  common=(--model /tmp/stash/model.gguf --bf16 --expect-loss 0.7932 --max-minutes "${MINUTES:-6}" --checkpoints 1.0 --seed 0)
  d=training/adapter
  "$PY" scripts/tune_adapter.py "${common[@]}" --epochs "${EPOCHS_V2:-0.9}" --data $d/ner-v1.npz --out /tmp/tune/ner-v2 > "$OUT/ner-v2.log" 2>&1 &
  "$PY" scripts/tune_adapter.py "${common[@]}" --epochs "${EPOCHS_CONLL:-0.75}" --data $d/ner-v1.npz $d/conll.npz --out /tmp/tune/ner-conll > "$OUT/ner-conll.log" 2>&1 &
  sleep 75; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -n 2 "$OUT"/*.log
  wait
  for name in ner-v2 ner-conll; do
    mkdir -p "$OUT/$name"
    ckpt=$(ls -d /tmp/tune/$name/ckpt-* | sort | tail -1)
    echo "$name: $ckpt"
    cp "$ckpt/adapter_model.safetensors" "$ckpt/adapter_config.json" /tmp/tune/$name/tuning.json "$OUT/$name/"
  done
  tail -n 3 "$OUT"/*.log
  ;;
esac
