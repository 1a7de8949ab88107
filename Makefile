# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 as a CPU wheel lies on local disk here; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# llama.cpp is compiled for a fixed, portable instruction set (x86-64-v3: AVX2, FMA, F16C), not -march=native: every
# x86 CPU then runs the same kernels with the same rounding, and never an instruction that the CPU lists but the
# OS or hypervisor has not enabled (a native build on a machine listing AMX died of SIGILL in its first matmul).
# The wheel is built once into .cache/wheels (pip's own cache would hand back a native build made earlier).
# Without OpenMP (ggml's own thread pool instead, as fast here): GNU OpenMP's threads do not survive fork(), so a
# process that had run the model hung in `nlp.pipe(..., n_process=2)`.
LLAMA_VERSION := 0.3.36
# Without the multimodal library (mtmd: images and audio, never used here) and without llama.cpp's common library
# (cmake/llama_cpp_no_common.cmake: the bindings never load it; half the compile time).
LLAMA_BUILD := $(LLAMA_VERSION)-avx2-noomp-nomtmd-nocommon
WHEELS := .cache/wheels
# the wheel is built by a venv of its own, so that `make -j2 install` compiles it while .venv installs
BUILD_VENV := $(WHEELS)/venv
LLAMA_CMAKE := -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/cmake/llama_cpp_no_common.cmake $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF,-DGGML_NATIVE=OFF)

.PHONY: install demo test clean chromium

$(WHEELS)/.llama-$(LLAMA_BUILD): cmake/llama_cpp_no_common.cmake
	mkdir -p $(WHEELS)
	test -x $(BUILD_VENV)/bin/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BUILD_VENV)/bin/python -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
		llama-cpp-python==$(LLAMA_VERSION) -w $(WHEELS)
	touch $@

# The package alone: wheels only, no compiler (the default torch engine needs no llama.cpp). `make demo` needs this.
$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(PY) -m pip install -q $(FIND_LINKS) -e .
	touch $@

# The test tools, from wheels (while llama.cpp compiles, under `make -j2`).
$(VENV)/.test-base: pyproject.toml $(VENV)/.base
	$(PY) -m pip install -q $(FIND_LINKS) -e ".[test-base,bench]"
	touch $@

# Everything the tests use: llama-cpp-python (built as above: engine = "llama.cpp", scoring, servers), test tools.
$(VENV)/.installed: pyproject.toml $(VENV)/.test-base $(WHEELS)/.llama-$(LLAMA_BUILD)
	# replaces a llama-cpp-python of the same version built another way (an older .venv's native build)
	$(PY) -m pip install -q --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PY) -m pip install -q $(FIND_LINKS) --find-links $(WHEELS) --only-binary llama-cpp-python \
		"llama-cpp-python==$(LLAMA_VERSION)" -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.base
	$(PY) -m spacy_llmner.cli annotate assets/sample_texts.txt --demonstrations assets/demonstrations.jsonl \
		--labels person,organisation,location,event --output demo_output

# The review-page test drives a real headless Chromium (Debian's package; root installs it when missing).
chromium:
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# llama.cpp compiles while the rest installs (two jobs)
test:
	$(MAKE) -j2 install chromium
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) demo_output .pytest_cache
