# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole pipeline (train -> search -> retrain + merge) on the embedded demo data, offline.
DEMO ?= configs/demo.yaml
demo: $(STAMP)
	$(PY) train.py --config $(DEMO)
	$(PY) search.py --config $(DEMO)
	$(PY) retrain.py --config $(DEMO)
	$(PY) -m engine.summary --config $(DEMO)

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
