# Two commands on a fresh machine:  `make chat`  (set up, then chat with the bundled demo model)
#                                   `make test`  (set up, then run the whole test suite)
# The environment lives in .venv/. TORCH pins the CPU wheel (an unpinned torch pulls a multi-GB
# CUDA build); on a GPU machine use e.g. `make chat TORCH=torch` to keep/get a CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# The CPU build of torch comes from PyTorch's CPU index when it is reachable (the public index's torch is
# a multi-GB CUDA build); where it is not, from the public index (CPU only where a local CPU wheel exists).
# Passing TORCH (e.g. TORCH=torch for a CUDA machine) skips the CPU index.
ifeq ($(origin TORCH),file)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
# The test run also installs every optional backend (CPU builds), pinned to versions known to work
# together (see docs in README): bitsandbytes, onnx + onnxruntime, triton (for TRITON_INTERPRET),
# TensorRT for RTX (its builder runs without a GPU, so the tests build real engines).
# The chat also gets onnxruntime: on a CPU, --mode auto builds the model's ONNX engine once into the
# user cache when it measures faster (the demo model: ~2x).
ONNX_PINS ?= onnxruntime==1.32.0 onnx==1.23.2 onnxscript==0.7.2
TEST_PINS ?= triton==3.7.1 $(ONNX_PINS) bitsandbytes==0.50.2 tensorrt-rtx-cu13==1.7.1.116 \
	compressed-tensors==0.20.0 import-linter==2.17 llguidance==1.9.1 openai==3.60.0 ollama==0.6.3 jsonschema==4.26.0 \
	llama-cpp-python==0.3.36
# llama.cpp's Python binding builds from source (4.3 minutes on this 2-core machine; pip keeps the built wheel in
# its cache, so a second setup reuses it): the library alone, for the GGUF checks and bench_llamacpp.py
LLAMA_CMAKE ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
VENV := .venv
TAG := $(shell echo '$(TORCH)' | tr -c 'a-zA-Z0-9.' _)
CHAT_STAMP := $(VENV)/.chat-$(TAG)
TEST_STAMP := $(VENV)/.test-$(TAG)
PIP := $(VENV)/bin/python -m pip install -q --disable-pip-version-check

.PHONY: setup chat test clean
setup: $(CHAT_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

define install_torch
	$(if $(TORCH_INDEX),$(PIP) --timeout 20 --retries 1 --index-url '$(TORCH_INDEX)' '$(TORCH)' 2>/dev/null || \
	  (echo "PyTorch's CPU index is not reachable: torch from the public index"; $(PIP) '$(TORCH)'),$(PIP) '$(TORCH)')
endef

# The package builds its CPU kernels when it is installed (setup.py); their torch operators need the torch
# installed here, so the package is built once more without build isolation (its dependencies as they are)
$(CHAT_STAMP): pyproject.toml setup.py kernels/csrc/* | $(VENV)/bin/python
	$(install_torch)
	$(PIP) -e '.[tui,onnx,structured]' $(ONNX_PINS) llguidance==1.9.1
	$(PIP) 'setuptools>=68' wheel && $(PIP) --no-build-isolation --no-deps -e .
	touch $@

$(TEST_STAMP): pyproject.toml setup.py kernels/csrc/* | $(VENV)/bin/python
	$(install_torch)
	CMAKE_ARGS='$(LLAMA_CMAKE)' CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) -e '.[test,tui,bench,quant,onnx,kernels,tensorrt-rtx,structured,llamacpp]' $(TEST_PINS)
	$(PIP) 'setuptools>=68' wheel && $(PIP) --no-build-isolation --no-deps -e .
	touch $@

chat: $(CHAT_STAMP)
	$(VENV)/bin/edge-dlm chat

test: $(TEST_STAMP)
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .pytest_cache
