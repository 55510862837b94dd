# make test      - create/reuse .venv, install requirements, run the default test suite (CPU):
#                  unit and in-process tests, one end-to-end run per method
# make test-slow - the other end-to-end tests (marker `slow`: resume after kill -9, torchrun, ...)
# make test-all  - both (what .ci/run runs)
# make demo      - the whole flow on synthetic hands with a tiny model (CPU, a few minutes)
# make bench     - benchmarks, results in benchmarks/results/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow test-all demo bench

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

# Synthetic raw 11k -> prepare -> baseline eval, Stage-1 and Stage-2 training (tiny model),
# fine-tuned evals -> summary table. Re-running skips what is already done.
demo: $(STAMP)
	$(PY) datasets/make_synthetic_hands.py --out datasets/synthetic_11k
	$(PY) datasets/prepare_11k.py --raw datasets/synthetic_11k
	$(PY) run_all_finetuned_stage1.py --train --configs 'configs/demo/eval_*.yml' --out logs/demo/summary

bench: $(STAMP)
	rm -f benchmarks/results/*.md
	$(PY) benchmarks/bench_metrics.py --out benchmarks/results/metrics.md
	$(PY) benchmarks/bench_data_path.py --out benchmarks/results/data_path.md
	$(PY) benchmarks/bench_train.py --out benchmarks/results/train.md
	$(PY) benchmarks/bench_eval.py --out benchmarks/results/eval.md
	$(PY) benchmarks/bench_likelihood_ratio.py --out benchmarks/results/likelihood_ratio.md
	$(PY) benchmarks/bench_checkpoint_io.py --models tiny --out benchmarks/results/checkpoint_io.md
	$(PY) benchmarks/bench_search.py --out benchmarks/results/search.md
	$(PY) benchmarks/bench_rerank.py --out benchmarks/results/rerank.md
	for part in metrics data_path train eval likelihood_ratio checkpoint_io search rerank; do cat benchmarks/results/$$part.md; echo; done \
	    > benchmarks/results/benchmarks.md
	@echo "wrote benchmarks/results/benchmarks.md"
