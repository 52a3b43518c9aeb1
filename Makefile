# Two commands do all set-up: `make demo` and `make test` each create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The versions this project is tested with (they lie on this machine's disk; pyproject.toml stays loose).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q $(TORCH_PINS) -e ".[vision,demo,dev]"
# TensorRT's API as type stubs for the mypy test; --no-deps: its dependency tensorrt cannot install here
	$(PY) -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/compress demo

test: $(STAMP)
	$(PY) -m pytest

# Every bench at its own defaults (ours and the peer's side by side), the model zoo too; writes bench/RESULTS.md
# and README.md's Measured figures block. `$(PY) bench/all.py --quick` is the ~15-minute smoke version.
bench: $(STAMP)
	$(PY) bench/all.py --full

clean:
	rm -rf runs .pytest_cache
