# Sirocco — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BIN ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
SECRET_FILE := var/secret_key
# PostgreSQL for the second test pass (CI always runs it; locally when the server answers).
TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15


.PHONY: help setup run test test-sqlite test-postgres lint format clean

help:
	@echo "make run    set up if needed, then run the whole platform at http://127.0.0.1:$${SIROCCO_PORT:-8000}"
	@echo "make test   set up if needed, then lint and run the whole test suite"
	@echo "make lint   ruff check + format check + vulture (dead code);  make format  fix formatting"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,runtime]'
	@rm -f $(VENV)/.installed-*
	@touch $@

$(SECRET_FILE):
	@mkdir -p var
	@umask 077 && $(PYTHON_BIN) -c 'import secrets; print(secrets.token_urlsafe(50))' > $@

setup: $(STAMP) $(SECRET_FILE)

run: setup
	@export SECRET_KEY=$$(cat $(SECRET_FILE)) && \
	  $(PY) manage.py migrate --noinput && \
	  $(PY) manage.py bootstrap_demo && \
	  exec $(PY) manage.py run_platform

# Dead code: vulture reads its settings from pyproject.toml ([tool.vulture]). Its "unused
# variable" findings are left out: they are class-level declarations Django and DRF read by name
# (model, serializer and form fields, settings); ruff's F841 already covers unused locals.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@! $(VENV)/bin/vulture 2>&1 | grep -v "unused variable"

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
define pytest
	$(PY) -m pytest $(1); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
endef

# `make test` passes SQLITE_MARKS="not backend_neutral" when the PostgreSQL pass follows: a test
# whose outcome does not depend on the database (every browser test) runs once, on PostgreSQL.
test-sqlite: setup
	env -u DATABASE_URL -u REDIS_URL -u CELERY_BROKER_URL \
	  $(call pytest,$(if $(SQLITE_MARKS),-m "$(SQLITE_MARKS)") $(PYTEST_ARGS))

# The second pass runs what touches the database, on PostgreSQL, with Redis for caches/limits.
test-postgres: setup
	DATABASE_URL=$(TEST_POSTGRES_URL) REDIS_URL=$(TEST_REDIS_URL) CELERY_BROKER_URL=$(TEST_REDIS_URL) \
	  $(call pytest,-m "not nodb" $(PYTEST_ARGS))

test: lint
	@if [ -n "$$CI" ] || pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then \
	  $(MAKE) --no-print-directory test-sqlite SQLITE_MARKS="not backend_neutral" && \
	  $(MAKE) --no-print-directory test-postgres; \
	else \
	  $(MAKE) --no-print-directory test-sqlite && \
	  echo "PostgreSQL is not running on 127.0.0.1:5432: skipped the PostgreSQL pass (CI runs it)."; \
	fi

clean:
	rm -rf var/ $(VENV)
