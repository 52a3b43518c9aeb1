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

# Each bench/*.py prints its table (ours and the peer's side by side); _*.py are shared helpers.
bench: $(STAMP)
	for f in bench/[!_]*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache
