# make demo: the offline main job.  make test: the whole test suite.  Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

install: $(STAMP)

# torch first, pinned: it takes the local CPU wheel; a bare `torch` requirement resolved by
# pip on its own would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ftcli train configs/mrpc-minilm.yaml --overwrite

# One worker per core; a test file stays on one worker, so the runs its module fixtures train are
# trained once. test-fast leaves out the tests marked slow (a developer's quick check).
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PYTEST) --durations=15

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
