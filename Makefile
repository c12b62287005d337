# Two commands that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m mmscale demo --output runs/demo

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check mmscale tools tests

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	DS_ACCELERATOR=cpu $(PY) tools/bench_data.py
	DS_ACCELERATOR=cpu $(PY) tools/bench_gradcache.py
	DS_ACCELERATOR=cpu $(PY) tools/bench_gradcache.py --skip_memory --zero_stage 0 --out bench_results/gradcache_zero0.json
	DS_ACCELERATOR=cpu $(PY) tools/bench_mining.py

clean:
	rm -rf $(VENV) runs build *.egg-info
