# The two commands of README.md: `make serve` and `make test`. Each sets up what it needs.
# The interpreter of the venv: CPython 3.11, a distribution's or the official image's build
# first (/usr/local/bin, /usr/bin: built with profile-guided and link-time optimization),
# then whatever python3.11 is on the PATH (pyenv builds without either by default). Same
# code and packages, the server answered 21% more requests/s at 64 connections on Debian's
# python3.11 than on pyenv's (README: Benchmarks). `make PYTHON=...` chooses another; one
# that cannot make a venv (Debian without python3.11-venv) is passed over.
PYTHON ?= $(shell for p in /usr/local/bin/python3.11 /usr/bin/python3.11 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import ensurepip, venv' 2>/dev/null && \
	{ command -v $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
REPOSITORY ?= model_repository
CHECKPOINTS ?= checkpoints

.PHONY: serve test repository lint venv clean lock bench rehearse

# pip reinstalls only when pyproject.toml changes (the stamp is newer otherwise). Not quiet:
# on a fresh machine this is the long part of the first `make serve` (README: First run), and
# pip's Collecting/Downloading lines show what it is doing meanwhile.
$(VENV)/.installed: pyproject.toml
	@echo "== Installing normserve with its export (torch, onnx) and dev extras into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[export,dev]'
	@echo "== Installed"
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

# Scale-out rehearsal, about a minute: 3 replicas in network namespaces behind HAProxy under
# wrk; a rolling restart, a kill -9 and a replica with a corrupted model; prints the counts.
# Needs root and Debian's haproxy, iproute2 and wrk (README.md, Scaling).
rehearse: repository
	$(BIN)/python -m benchmarks.rehearse --repository $(REPOSITORY)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service

# pytest exits 5 when it collected no test: make treats that like any failure.
test: lint
	$(BIN)/python -m pytest

# Re-pins the two closures the image installs with --no-deps, resolved in one throw-away
# environment so that the packages they share get the same versions:
#   requirements/serve.txt   [project.dependencies]: the runtime stage
#   requirements/export.txt  [project.dependencies] + the export extra, less torch: the
#                            training stage, which installs torch itself from TORCH_PIP_ARGS
# torch comes first from PyTorch's CPU index (PyPI's Linux torch is a CUDA build whose nvidia-*
# packages would enter the lock); TORCH_PIP_ARGS="--find-links DIR" takes a local wheel.
# --all: torch needs setuptools>=77, which a plain freeze hides (pip alone stays out).
TORCH_PIP_ARGS ?= --index-url https://download.pytorch.org/whl/cpu
TORCH_PIN = $(shell sed -n 's/.*"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
LOCK_NOTE = Regenerate with \`make lock\`; tests check it agrees.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet .
	{ echo "# Serving dependencies of the runtime image, pinned: the closure of [project.dependencies]"; \
	  echo "# in pyproject.toml as pip resolved it. $(LOCK_NOTE)"; \
	  .lock-venv/bin/python -m pip freeze --exclude normserve; } > requirements/serve.txt
	.lock-venv/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) '$(TORCH_PIN)'
	.lock-venv/bin/python -m pip install --quiet '.[export]'
	{ echo "# The training stage's dependencies, pinned: the closure of [project.dependencies] and the"; \
	  echo "# export extra, less torch (the Dockerfile installs $(TORCH_PIN) from its CPU index)."; \
	  echo "# $(LOCK_NOTE)"; \
	  .lock-venv/bin/python -m pip freeze --all --exclude pip --exclude normserve --exclude torch; } > requirements/export.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(REPOSITORY) $(CHECKPOINTS) .pytest_cache .ruff_cache .bench
