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

# the slow tests include lm-evaluation-harness on an exported adapter: its extra is installed once (torch stays pinned)
test-all: setup
	@$(PY) -c "import lm_eval" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check \
		"torch==$${CELORA_TORCH:-2.13.0}" -e ".[lmeval]"
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)
