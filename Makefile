# oscbench: `make run` trains the default configuration, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

SWEEP  ?= multirun/compare_methods-cnn_small-digits
# make test: pytest-xdist's workers (auto: one per core), each on one torch thread
JOBS   ?= auto

.PHONY: install run test lint sweep report claims claims-plateau claims-2bit deploy bench gpu-wheels gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

run: install
	$(PY) -m oscbench.run $(ARGS)

test: install
	$(PY) -m pytest -n $(JOBS) $(ARGS)

sweep: install
	$(PY) -m oscbench.run experiment=compare_methods $(ARGS)

report: install
	$(PY) -m oscbench.report $(SWEEP)

claims: install  # the claims study (experiments/claims): under 2 hours on 2 cores; again: continues
	$(PY) -m oscbench.claims experiments/claims/study.yaml --sweep-dir multirun/claims $(ARGS)

claims-plateau: install  # the evidence that the study's runs have plateaued: about 3 h 10 min
	$(PY) -m oscbench.claims experiments/claims/plateau.yaml --sweep-dir multirun/claims-plateau \
		--out experiments/claims/plateau $(ARGS)

claims-2bit: install  # AOQ's and OFQ's 2-bit headlines, 160-epoch cells, 3 seeds: about 1 h 45 min
	$(PY) -m oscbench.claims experiments/claims/two_bit.yaml --sweep-dir multirun/claims-2bit \
		--out experiments/claims/two_bit $(ARGS)

deploy: install  # every preset exported to onnxruntime, with and without BN folding (experiments/deploy)
	$(PY) -m oscbench.claims experiments/deploy/study.yaml --sweep-dir multirun/deploy $(ARGS)

bench: install
	$(PY) bench/bench.py $(ARGS)

WHEEL_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64)

gpu-wheels:  # here: what gpu-check needs on a GPU machine (Python 3.12), into .whl/
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(WHEEL_PLATFORMS) -d .whl -r bench/gpu_wheels.txt
	$(PYTHON) -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3

gpu-check:  # on a GPU machine: .whl/ beside its own torch, then bench/gpu_check.py (bench/gpu.md)
	$(PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/oscbench-site .whl/*.whl
	PYTHONPATH=/tmp/oscbench-site:. $(PYTHON) bench/gpu_check.py $(ARGS)

lint: install
	$(PY) -m ruff check oscbench tests

clean:
	rm -rf runs multirun outputs .pytest_cache
