# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv dev clean fixtures

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

# Regenerate the committed fixtures (needs torch==2.13.0, onnxscript, scikit-learn, skl2onnx).
fixtures: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet torch==2.13.0 onnxscript scikit-learn skl2onnx
	$(BIN)/python fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis
