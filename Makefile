# The two commands of README.md: `make serve` and `make test`. Each sets up what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
REPOSITORY ?= model_repository
CHECKPOINTS ?= checkpoints

.PHONY: serve test repository lint venv clean lock bench

# pip reinstalls only when pyproject.toml changes (the stamp is newer otherwise).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[export,dev]'
	touch $@

venv: $(VENV)/.installed

# Trains what has no checkpoint and exports what the repository lacks; seconds when complete.
repository: $(VENV)/.installed
	$(BIN)/python -m export build --repository $(REPOSITORY) --checkpoints $(CHECKPOINTS) --skip-existing

# Serves on 127.0.0.1:8000; flags and NORMSERVE_* variables are in README.md.
serve: repository
	$(BIN)/python -m service --repository $(REPOSITORY)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[export,dev,bench]'
	touch $@

# Engines in-process and the service under wrk against MLServer (its own venv, .bench/):
# about 15 minutes; BENCH_ARGS=--quick for a one-minute smoke run. Results: reports/bench/.
bench: repository $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks --repository $(REPOSITORY) --checkpoints $(CHECKPOINTS) $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service

# pytest exits 5 when it collected no test: make treats that like any failure.
test: lint
	$(BIN)/python -m pytest

# Re-pins requirements/serve.txt (what the runtime image installs, with --no-deps) to the
# closure of pyproject's [project.dependencies], resolved in a throw-away environment.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet .
	{ echo "# Serving dependencies of the runtime image, pinned: the closure of [project.dependencies]"; \
	  echo "# in pyproject.toml as pip resolved it. Regenerate with \`make lock\`; tests check it agrees."; \
	  .lock-venv/bin/python -m pip freeze --exclude normserve; } > requirements/serve.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(REPOSITORY) $(CHECKPOINTS) .pytest_cache .ruff_cache .bench
