#!/usr/bin/env bash
# Runs every real-model test (pytest -m model) under other llama.cpp kernels than the shipped build's default run:
# other thread counts and batch shapes (SPACY_LLMNER_TEST_THREADS / _PARALLEL), and, for each llama-cpp-python
# build folder given (an unpacked wheel compiled for another instruction set, e.g. AVX-512 + VNNI + BF16 as on AMD
# EPYC), the same again with that build first on PYTHONPATH. A test that passes only on some of them sits on a tie.
#   scripts/cross_kernel_tests.sh [BUILD_DIR ...]      (a BUILD_DIR holds llama_cpp/; none: the shipped build)
#   VARIANTS="1 8;2 3" scripts/cross_kernel_tests.sh   (threads and parallel per run; default "2 8;1 8;2 1;2 3")
#   scripts/cross_kernel_tests.sh --dry-run [BUILD_DIR ...]   (prints each run's environment and command, runs none)
# A build for another instruction set: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ..." pip wheel --no-cache-dir
# --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -w DIR, then unzip the wheel into a folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
dry=""
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
if [ $# -gt 0 ]; then builds=("$@"); else builds=(""); fi  # no argument: the shipped build
status=0
for build in "${builds[@]}"; do
  IFS=';' read -ra variants <<< "${VARIANTS:-2 8;1 8;2 1;2 3}"
  for variant in "${variants[@]}"; do
    set -- $variant
    label="build=${build:-shipped} threads=$1 parallel=$2"
    envs=(PYTHONPATH="${build}" SPACY_LLMNER_TEST_THREADS=$1 SPACY_LLMNER_TEST_PARALLEL=$2 HF_HUB_OFFLINE=1)
    cmd=($PY -m pytest -q -m model -p no:cacheprovider tests --deselect tests/test_load_faults.py
         --deselect tests/test_project.py)
    if [ -n "$dry" ]; then echo "$label: ${envs[*]} ${cmd[*]}"; continue; fi
    out=$(env "${envs[@]}" "${cmd[@]}" 2>&1 | tail -3)
    echo "$label: $(echo "$out" | tail -1)"
    echo "$out" | grep -q "failed" && { status=1; echo "$out"; }
  done
done
exit $status
