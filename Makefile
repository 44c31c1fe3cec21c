# One entry point per workflow; each target sets the environment up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.needles-setup
# Tests that start no engine and train nothing (see tests/conftest.py for the "heavy" mark).
FAST := -m "not heavy"
# pytest-xdist workers, up to 4. Light tests are mostly single-threaded Python (subprocess starts, imports,
# tokenizers); a heavy test's engine or training run alternates single-threaded start-up with work on every core,
# so two of them side by side still fill the machine better than one. --dist loadgroup keeps each heavy file, and
# every test that shares a session's SmolLM2 run, on one worker (tests/conftest.py), so nothing trains twice.
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: setup demo test test-fast bench lint format

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/needles demo

test: $(STAMP)
	bash scripts/test-deps.sh
	$(PY) -m pytest -q -rs --durations=30 -n $(WORKERS) --dist loadgroup

test-fast: $(STAMP)
	bash scripts/test-deps.sh
	$(PY) -m pytest -q -rs --durations=10 -n $(WORKERS) $(FAST)

# Every benchmark that fits on a CPU (~40 min on 2 cores); the finetuning one needs TRL (the [bench] extra).
bench: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[bench]"
	$(PY) benchmarks/bench_kv_generation.py
	$(PY) benchmarks/bench_startup.py
	$(PY) benchmarks/bench_eval_overhead.py
	$(PY) benchmarks/bench_heads.py
	$(PY) benchmarks/bench_finetune.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) scripts/check_import_cycles.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .
