# The two commands of the README. Each sets up .venv itself (scripts/setup-env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/tiny-sft-demo

.PHONY: setup demo test test-fast docs bench clean

setup:
	@bash scripts/setup-env.sh

demo: setup
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/launcher run recipes/examples/tiny-sft.yaml --run-dir $(DEMO_DIR)
	$(VENV)/bin/launcher plot $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

docs: setup
	$(VENV)/bin/launcher recipes docs --out docs/recipe-reference.md

bench: setup
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf runs .pytest_cache
