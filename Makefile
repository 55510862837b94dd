# make test  - create/reuse .venv, install requirements, run the test suite (CPU)
# make demo  - the whole flow on synthetic hands with a tiny model (CPU, a few minutes)
# make bench - benchmarks, results in benchmarks/results/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean-demo

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q
