# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv dev clean fixtures bench bench-paper bench-exporters bench-budget fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime install (no test tools).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Install with the dev extras (pytest, hypothesis).
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	@mkdir -p build
	$(BIN)/onnx-esvd layers fixtures/law_school_mlp_legacy.onnx
	@echo
	$(BIN)/onnx-esvd repair fixtures/law_school_mlp_legacy.onnx --layer -2 \
		--data fixtures/law_school.csv --group race1 --target ugpa \
		-o build/law_school_mlp_legacy.esvd.onnx --force

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

# The command-line fuzz of tests/test_fuzz.py, longer (the suite runs 100 seeded runs); about 5 minutes.
# FUZZ_SEED=n picks another sequence.
FUZZ_RUNS ?= 2000
fuzz: $(VENV)/.installed-dev
	FUZZ_RUNS=$(FUZZ_RUNS) FUZZ_SEED=$${FUZZ_SEED:-1} $(BIN)/python -m pytest -q tests/test_fuzz.py::test_fuzz_bounded

# Benchmark and fixture tools: torch==2.13.0 (CPU), onnxscript, scikit-learn, skl2onnx, matplotlib.
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@ $(VENV)/.installed

# Regenerate the committed fixtures.
fixtures: $(VENV)/.installed-bench
	$(BIN)/python fixtures/make_fixtures.py

# Speed and memory targets on synthetic data (about 10 minutes; needs only the runtime install).
bench: $(VENV)/.installed
	@mkdir -p build
	$(BIN)/python benchmarks/speed.py --json build/speed.json

# The paper's Law School table, the baselines and the trade-off plot (about an hour on 2 cores; the
# tune_layers=all row on the first seed only).
bench-paper: $(VENV)/.installed-bench
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/paper_law_school.py --seeds 10 --tune-all-seeds 1 --plot docs/law_school_tradeoff.png

# repair --max-ks 0.06 (ranked out of fold) on held-out Law School models, beside no repair and the barycenter.
bench-budget: $(VENV)/.installed-bench
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/paper_law_school.py --seeds 10 --no-repairs --no-sweep

# The default repair on models from torch's two exporters and skl2onnx.
bench-exporters: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/exporters_law_school.py --seeds 5

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis
