# The two commands of the README: `make run` (default experiment) and `make test`.
PY := .venv/bin/python
ARGS ?=

.PHONY: setup run test test-all
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m celora $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)
