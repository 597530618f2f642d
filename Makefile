# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole pipeline (train -> search -> retrain + merge) on embedded data, offline; then LoRA at the
# budget GLoRA's search was held to (retrain.rank of the config), retrained from scratch, for comparison.
DEMO ?= configs/demo.yaml
LORA_OUT ?= runs/$(basename $(notdir $(DEMO)))-lora
demo: $(STAMP)
	$(PY) train.py --config $(DEMO)
	$(PY) search.py --config $(DEMO)
	$(PY) retrain.py --config $(DEMO)
	$(PY) retrain.py --config $(DEMO) --set retrain.preset=lora --set retrain.init=scratch --set output_dir=$(LORA_OUT)
	$(PY) -m engine.summary --config $(DEMO) --baseline $(LORA_OUT)

# Every test, including the end-to-end ones that run the real CLIs.
test: $(STAMP)
	$(PY) -m pytest -q

# Only the fast unit tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.run --quick

clean:
	rm -rf runs .pytest_cache
