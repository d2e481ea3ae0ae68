# Two commands on a fresh machine:  `make chat`  (set up, then chat with the bundled demo model)
#                                   `make test`  (set up, then run the whole test suite)
# The environment lives in .venv/. TORCH pins the CPU wheel (an unpinned torch pulls a multi-GB
# CUDA build); on a GPU machine use e.g. `make chat TORCH=torch` to keep/get a CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'a-zA-Z0-9.' _)

.PHONY: setup chat test clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check '$(TORCH)'
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test,tui,bench]'
	touch $@

chat: setup
	$(VENV)/bin/edge-dlm chat

test: setup
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .pytest_cache
