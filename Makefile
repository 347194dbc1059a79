# Shortcuts; each target is also spelled out in the README for machines without make.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test check bench bench-quick bench-scale load lock clean

# The pinned set CI tests (requirements-test.lock), then the checkers on top.
$(VENV)/.installed: pyproject.toml requirements-test.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --require-hashes -r requirements-test.lock
	$(VENV)/bin/pip install -q --no-deps -e .
	$(VENV)/bin/pip install -q 'ruff>=0.6' 'mypy>=1.11'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/vlmrun-cache serve

test: $(VENV)/.installed
	$(PY) -m pytest

check: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) bench/run.py

bench-quick: $(VENV)/.installed
	$(PY) bench/run.py --quick

# 1M entries of 1 KiB beside 1k (filled once into /tmp/vlmrun-scale, about 4 GiB; about half an hour).
bench-scale: $(VENV)/.installed
	$(PY) bench/scale.py $(SCALE_FLAGS)

load: $(VENV)/.installed
	$(PY) bench/load.py

# The pinned, hashed dependency sets, from pyproject.toml: requirements-test.lock (runtime + the
# test extra; CI installs it) first, then requirements.lock (runtime + the build backend; the
# image installs it) within it, so the image ships the versions CI tested. Pins still allowed by
# pyproject.toml are kept; `make lock LOCK_FLAGS=--upgrade` moves everything to the newest.
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --generate-hashes \
	--strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links $(LOCK_FLAGS)

lock: $(VENV)/.installed
	$(VENV)/bin/pip install -q 'pip-tools>=7.4'
	$(PIP_COMPILE) --extra test -o requirements-test.lock pyproject.toml
	$(PIP_COMPILE) --all-build-deps -c requirements-test.lock -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
