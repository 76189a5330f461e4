# Two entry points: `make demo` installs and runs the main job on the built-in model;
# `make test` installs and runs the test suite. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,compress,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medlite build recipes/xavier-agx-int8.yaml

# The full suite, as CI runs it: the fast tests, then the slow ones — the built-in demo model is
# trained once (about 5 min on 2 cores, cached in $$MEDLITE_CACHE or the user cache dir) and every
# shipped recipe is built, gated and verified on it. GPU tests skip without a GPU.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: everything except the slow tests (about 2 min).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) artifacts
