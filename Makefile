# The two commands of the README. Each sets up .venv itself (scripts/setup-env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
# SkyPilot's own venv (scripts/setup-env.sh): its click pin conflicts with .venv's packages
SKY_PY := .venv-sky/bin/python
DEMO_DIR ?= runs/tiny-sft-demo

.PHONY: setup setup-test demo test test-fast test-multinode docs bench clean

# The demo needs .venv alone; the tests also need .venv-sky (SkyPilot's own task parser).
setup:
	@bash scripts/setup-env.sh

setup-test:
	@bash scripts/setup-env.sh --sky

demo: setup
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/launcher run recipes/examples/tiny-sft.yaml --run-dir $(DEMO_DIR)
	$(VENV)/bin/launcher plot $(DEMO_DIR)

# The Slurm tests run against a single-host Slurm started here and stopped afterwards, even when
# tests fail (cluster/dev/slurm-up.sh installs Debian's slurm + munge when missing); one that was
# already running is left running.
# LAUNCHER_REQUIRE_SLURM=1: the Slurm tests fail instead of skipping if it did not come up.
# SkyPilot's parser tests are skipped in .venv (no SkyPilot there) and run again in .venv-sky,
# where LAUNCHER_REQUIRE_SKYPILOT=1 makes a missing SkyPilot a failure.
SLURM_DIR ?= /tmp/launcher-slurm
# the 2-node cluster of tests/test_multinode.py (network namespaces: needs root)
SLURM_MN_DIR ?= /tmp/launcher-slurm-mn

# Two pytest workers (pytest-xdist): much of a multi-process test is waiting (Ray and Slurm
# starting, polls), which the other worker fills. `--dist loadfile`: a file's tests stay on one
# worker, so module fixtures (the parity runs, the uninterrupted baselines) run once and the
# Slurm tests, all in tests/test_slurm_integration.py, submit one job at a time. TEST_WORKERS=0:
# one process.
TEST_WORKERS ?= 2

SKY_LOG ?= /tmp/launcher-make-test-sky.log

# The local Slurm comes up (Debian packages on a fresh machine) while the venvs install, and
# SkyPilot's two checks run in .venv-sky beside the main suite; their output follows it.
test:
	@export LAUNCHER_SLURM_DIR=$(SLURM_DIR) SLURM_CONF=$(SLURM_DIR)/slurm.conf; \
	was_up=0; [ -f $$SLURM_CONF ] && timeout 5 sinfo -h >/dev/null 2>&1 && was_up=1; \
	bash cluster/dev/slurm-up.sh >/dev/null & slurm=$$!; \
	bash scripts/setup-env.sh --sky; setup=$$?; \
	wait $$slurm; up=$$?; \
	if [ $$setup -ne 0 ]; then echo "make test: setting up the venvs failed (see above)"; exit 1; fi; \
	( echo "SkyPilot's task parser on the rendered tasks ($(SKY_PY)):"; \
	  LAUNCHER_REQUIRE_SKYPILOT=1 $(SKY_PY) -m pytest -q -p no:cacheprovider tests/test_skypilot_render.py -k own_parser || exit 1; \
	  echo "--json prints JSON alone with SkyPilot installed ($(SKY_PY)):"; \
	  LAUNCHER_REQUIRE_SKYPILOT=1 $(SKY_PY) -m pytest -q -p no:cacheprovider tests/test_json_output.py tests/test_estimate_suggest.py \
	) > $(SKY_LOG) 2>&1 & sky=$$!; \
	LAUNCHER_REQUIRE_SLURM=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30; rc=$$?; \
	wait $$sky || rc=1; cat $(SKY_LOG); \
	[ $$was_up = 1 ] || bash cluster/dev/slurm-down.sh; \
	if [ $$up -ne 0 ]; then echo "make test: the local Slurm did not come up (see above)"; exit 1; fi; \
	exit $$rc

# The 2-node group (tests/test_multinode.py, tests/test_skypilot_multinode.py): two network
# namespaces with a slurmd each (root). Not yet part of `make test`: see docs/slurm.md.
test-multinode: setup
	@LAUNCHER_SLURM_DIR=$(SLURM_MN_DIR) bash cluster/dev/slurm-up.sh --nodes 2 >/dev/null || exit 1; \
	LAUNCHER_MULTINODE=1 LAUNCHER_REQUIRE_SLURM=1 $(PY) -m pytest -q tests/test_multinode.py tests/test_skypilot_multinode.py; rc=$$?; \
	LAUNCHER_SLURM_DIR=$(SLURM_MN_DIR) bash cluster/dev/slurm-down.sh --nodes 2; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

docs: setup
	$(VENV)/bin/launcher recipes docs --out docs/recipe-reference.md

bench: setup
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf runs .pytest_cache .venv-sky
