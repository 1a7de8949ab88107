#!/usr/bin/env bash
# Tunes NER adapters on a lent GPU machine (never needed by tests or CI). A device call carries at most 64 MiB with
# the working tree, so what the run needs (the base GGUF, the token files, wheels of this repository's own
# transformers / tokenizers / huggingface_hub / peft / gguf versions) travels as one xz stream in four pieces:
#   here:    bash scripts/gpu_adapter.sh pack training/adapter/ner-v3.npz     -> .dev/0 .. .dev/3 (+ .dev/blob.md5)
#   device:  bash scripts/gpu_adapter.sh recv 0 ... recv 2   (carry .dev/<i>; each piece copied to /tmp/stash, which
#                                                             survives between calls while the machine stays warm)
#   device:  RUNS="name:data:epochs[:exclude,...] ..." EXPECT=<reference loss> bash scripts/gpu_adapter.sh tune
#                                                            (carry .dev/3; EXPECT from tune_adapter.py --check-only)
# `tune` joins and unpacks the pieces, checks the model, installs the wheels into /tmp/pylib and trains every run of
# RUNS at once on the one GPU; each run's last checkpoint, tuning.json and log come back as $OUT/<name>.tar (a call
# returns at most eight files). The device image has no spaCy: scripts/tune_adapter.py needs only the package's
# GGUF loader (spacy_llmner/backends/weights.py) and training loop (spacy_llmner/finetune/loop.py), so the launcher
# below imports them without running the __init__ modules of backends/ and finetune/ (which import spaCy).
set -euo pipefail
PY=$(command -v python3 || command -v python)
PIECES=4
STASH=${STASH:-/tmp/stash}  # where the pieces, the model and the token files lie on the device
TUNE=${TUNE:-/tmp/tune}     # the runs' output folders
run_args() {  # name and the tune_adapter.py arguments (args) of one RUNS entry, name:data:epochs[:exclude,...]
  IFS=: read -r name data epochs exclude <<< "$1"
  args=(--model "$STASH/model.gguf" --data "$STASH/data/$data" --epochs "$epochs" --bf16 --seed 0
        --checkpoints 1.0 --max-minutes "${MINUTES:-7}" --out "$TUNE/$name" ${EXPECT:+--expect-loss "$EXPECT"})
  if [ -n "${exclude:-}" ]; then args+=(--exclude ${exclude//,/ }); fi
}
case "$1" in
args)  # the arguments one RUNS entry gives tune_adapter.py, a line each (tests/test_scripts.py runs them dry)
  run_args "$2"; printf '%s\n' "${args[@]}"
  ;;
pack)
  shift
  gguf=$("${PY}" -c "from spacy_llmner.backends.llamacpp import resolve_model_path; print(resolve_model_path('gemma3-270m'))")
  rm -rf .dev && mkdir -p .dev/stage/data
  cp "$gguf" .dev/stage/model.gguf
  cp "$@" .dev/stage/data/
  cp .whl/*.whl .dev/stage/
  (cd .dev/stage && md5sum model.gguf > model.md5 && tar cf - model.gguf model.md5 data ./*.whl) | xz -9 -T2 > .dev/blob.xz
  rm -rf .dev/stage
  size=$(stat -c %s .dev/blob.xz)
  piece=$(((size + PIECES - 1) / PIECES))
  for i in $(seq 0 $((PIECES - 1))); do
    mkdir -p ".dev/$i"
    dd if=.dev/blob.xz of=".dev/$i/part" bs=1M iflag=skip_bytes,count_bytes skip=$((i * piece)) count=$piece status=none
  done
  md5sum .dev/blob.xz | cut -d' ' -f1 > .dev/blob.md5 && cp .dev/blob.md5 .dev/$((PIECES - 1))/
  rm .dev/blob.xz
  ls -la .dev/*/part
  ;;
recv)
  mkdir -p "$STASH" && cp ".dev/$2/part" "$STASH/part-$2"
  ls -la "$STASH"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; nproc
  ;;
tune)
  last=$((PIECES - 1))
  mkdir -p "$STASH" /tmp/pylib "$TUNE" && cp ".dev/$last/part" "$STASH/part-$last"
  cd "$STASH"
  cat $(for i in $(seq 0 $last); do echo "part-$i"; done) > blob.xz
  echo "$(cat "$OLDPWD/.dev/$last/blob.md5")  blob.xz" | md5sum -c
  xz -dc blob.xz | tar xf - && rm blob.xz && md5sum -c model.md5
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pylib ./*.whl
  cd "$OLDPWD"
  export PYTHONPATH=/tmp/pylib OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
  for run in ${RUNS:?RUNS names the runs: name:data:epochs[:exclude,...]}; do
    run_args "$run"
    "$PY" - "${args[@]}" > "$TUNE/$name.log" 2>&1 <<'EOF' &
import runpy, sys, types
import spacy_llmner
for sub in ("backends", "finetune"):  # their __init__ modules import spaCy: the packages without them
    pkg = types.ModuleType(f"spacy_llmner.{sub}")
    pkg.__path__ = [f"{spacy_llmner.__path__[0]}/{sub}"]
    sys.modules[pkg.__name__] = pkg
    setattr(spacy_llmner, sub, pkg)
sys.argv = ["scripts/tune_adapter.py", *sys.argv[1:]]
runpy.run_path("scripts/tune_adapter.py", run_name="__main__")
EOF
  done
  sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; tail -qn 1 "$TUNE"/*.log
  wait || true
  for log in "$TUNE"/*.log; do
    name=$(basename "$log" .log)
    ckpt=$(ls -d "$TUNE/$name"/ckpt-* 2>/dev/null | sort | tail -1 || true)
    echo "== $name: ${ckpt:-no checkpoint}"; tail -n 3 "$log"
    files=("$name.log")
    [ -n "$ckpt" ] && files+=("$name/$(basename "$ckpt")")
    [ -f "$TUNE/$name/tuning.json" ] && files+=("$name/tuning.json")
    tar cf "$OUT/$name.tar" -C "$TUNE" "${files[@]}"
  done
  ls -la "$OUT"
  ;;
esac
