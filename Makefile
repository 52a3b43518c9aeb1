# Two commands do all set-up: `make demo` and `make test` each create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The versions this project is tested with (they lie on this machine's disk; pyproject.toml stays loose).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench install clean ci-baselines

# -qq: pip's errors only (a quiet pip still prints a warning per unreachable local index entry and the
# build backend's notices, a page that hides what matters); each step says what it does instead.
PIP := $(PY) -m pip install -qq

$(STAMP): pyproject.toml
	@echo "set-up: virtual environment $(VENV) ($(PYTHON))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@echo "set-up: $(TORCH_PINS) (about a minute)"
	@$(PIP) $(TORCH_PINS)
	@echo "set-up: compress and its dependencies (editable, extras vision, demo, dev)"
	@$(PIP) $(TORCH_PINS) -e ".[vision,demo,dev]"
# TensorRT's API as type stubs for the mypy test; --no-deps: its dependency tensorrt cannot install here
	@$(PIP) --no-deps tensorrt-stubs==10.13.0.35.1
	@touch $(STAMP)
	@echo "set-up: done ($$($(PY) -c 'import torch, onnxruntime; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__)'))"

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/compress demo

test: $(STAMP)
	$(PY) -m pytest

# Every bench at its own defaults (ours and the peer's side by side), the model zoo too; writes bench/RESULTS.md
# and README.md's Measured figures block. `$(PY) bench/all.py --quick` is the ~15-minute smoke version.
bench: $(STAMP)
	$(PY) bench/all.py --full

# After an intended change to what the CI recipes produce: rerun them and rewrite their baselines (.ci/run).
ci-baselines: $(STAMP)
	@for recipe in recipes/ci-*.yaml; do name=$$(basename $$recipe .yaml); \
	  $(VENV)/bin/compress run $$recipe --out runs/$$name --no-resume --quiet && \
	  $(VENV)/bin/compress gate --write-baseline runs/$$name/report.json --out recipes/baselines/$$name.json || exit 1; \
	done

clean:
	rm -rf runs .pytest_cache
