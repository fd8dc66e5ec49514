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

DEPLOY_VENV ?= .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

.PHONY: demo test test-deploy install clean-demo

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

# the MONAI Deploy application and its test, in a separate venv: the App SDK brings Holoscan and changes some of
# the main install's packages (protobuf, cuda-bindings); not part of `make test`
$(DEPLOY_STAMP): pyproject.toml
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEPLOY_VENV)/bin/python -m pip install --quiet -e ".[test,deploy]"
	touch $(DEPLOY_STAMP)

test-deploy: $(DEPLOY_STAMP)
	REQUIRE_MONAI_DEPLOY=1 $(DEPLOY_VENV)/bin/python -m pytest -q --timeout 900 tests/test_deploy.py tests/test_deploy_dicom.py

clean-demo:
	rm -rf $(DEMO_DIR)
