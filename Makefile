# The two README commands. Both run the same idempotent set-up first (creates .venv).
PY := .venv/bin/python

.PHONY: setup demo test

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m dgemma_vllm.demo

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15
