# oscbench: `make run` trains the default configuration, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

SWEEP  ?= multirun/compare_methods-cnn_small-digits

.PHONY: install run test lint sweep report claims bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m oscbench.run $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

sweep: install
	$(PY) -m oscbench.run experiment=compare_methods $(ARGS)

report: install
	$(PY) -m oscbench.report $(SWEEP)

claims: install  # the claims study (experiments/claims): about an hour on 2 cores; again: continues
	$(PY) -m oscbench.claims experiments/claims/study.yaml --sweep-dir multirun/claims $(ARGS)

bench: install
	$(PY) bench/bench.py $(ARGS)

lint: install
	$(PY) -m ruff check oscbench tests

clean:
	rm -rf runs multirun outputs .pytest_cache
