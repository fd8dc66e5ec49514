# Two commands for a fresh machine:
#   make demo   install into .venv and run the whole demo on generated slides
#   make test   install into .venv (with test extras) and run the test suite
PYTHON ?= python3.11
# OpenMP threads that spin-wait fight the slide decoder threads and any other process for the 2 cores
# (measured 5-10x slowdowns of torch on a busy machine; see BENCHMARKS.md)
export OMP_WAIT_POLICY ?= PASSIVE
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: demo test install clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/run_demo.py run --output_dir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -x -q --timeout 900 tests

clean-demo:
	rm -rf $(DEMO_DIR)
