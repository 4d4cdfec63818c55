# fedsrd: `make demo` runs the main job, `make test` runs the tests; each sets itself up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench data clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first, pinned, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(PY) examples/fed_train.py --config examples/configs/demo.yaml

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks

bench: install
	$(PY) benchmarks/run_all.py

# The benchmark data sets (code, medical, finance, math, sst2, qnli) in data/, downloaded from their repositories at
# pinned commits and checked by git blob id (needs the network; standard library only, so no install first).
# Offline, with the files already downloaded: make data DATA_ARGS="--source-dir DIR" (DIR/<repository>/<path>).
data:
	$(PYTHON) benchmarks/prepare_data.py --out data/ $(DATA_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info outputs
