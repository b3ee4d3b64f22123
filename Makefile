# kdistill: every install step lives here. `make test` on a fresh machine creates .venv, installs, tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: pin torch to the CPU build so pip does not pull GBs of CUDA packages.
# On a GPU machine use `make install CONSTRAINTS=` (normal torch build) or `pip install -e .`.
CONSTRAINTS ?= constraints/cpu.txt
PIP_CONSTRAINT := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
PYTEST_ARGS ?=

.PHONY: install test test-fast quickstart demo demo-t5 clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install --quiet $(PIP_CONSTRAINT) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The test suite (offline; tiny config-built models; real data from ../shared/data).
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Everything but the slow end-to-end runs.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The main job: distil all-MiniLM-L6-v2 into a 3-layer student offline; prints teacher vs students.
quickstart: install
	$(BIN)/kdistill quickstart

# Offline logit KD of a tiny Qwen2-style pair on bundled Alpaca data.
demo: install
	$(BIN)/kdistill tiny --out runs/tiny-causal --kind causal --data examples/data/alpaca_2000.jsonl --teacher-steps 60
	$(BIN)/kdistill train examples/tiny/decoder_kd.yaml

demo-t5: install
	$(BIN)/kdistill tiny --out runs/tiny-t5 --kind t5 --data examples/data/alpaca_2000.jsonl --teacher-steps 60
	$(BIN)/kdistill train examples/tiny/t5_kd.yaml

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
