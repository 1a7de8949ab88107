# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 as a CPU wheel lies on local disk here; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(PY) -m pip install -q $(FIND_LINKS) -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m spacy_llmner.cli annotate assets/sample_texts.txt --demonstrations assets/demonstrations.jsonl \
		--labels person,organisation,location,event --output demo_output

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo_output .pytest_cache
