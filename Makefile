# dsv3conv: `make demo` and `make test` set everything up themselves in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned by version only: here that takes the local CPU wheel in seconds; on a GPU machine PyPI's
# build of the same version is the CUDA one. Override with `make setup TORCH=torch==X` for another build.
TORCH ?= torch==2.13.0
# A CPU-only host: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes torch's CPU build.
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test,interop]"
	$(BIN)/python -m dsv3conv.kernels.fp8_block_numba  # the CPU kernel compiled into numba's cache, once
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python scripts/bench_cpu_kernels.py
	$(BIN)/python scripts/bench_cpu.py --gb 1 --out bench-results

lint: setup
	$(BIN)/ruff check dsv3conv kernels tests scripts
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
