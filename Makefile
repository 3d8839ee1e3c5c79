# Two commands on a fresh machine: `make demo`, then `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch==2.13.0 first: it is the local CPU wheel; a bare "torch" could pull a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .

demo: install
	$(BIN)/memedit info
	$(BIN)/memedit generate "Reidreir was born in"

# The browser tests of `memedit report` need a Chromium (apt-get install chromium); without one they skip, and -rs
# prints the one line saying so.
test: install
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -m pytest -rs tests

bench: install
	$(BIN)/python benchmarks/bench_lookup.py

clean:
	rm -rf $(VENV) build *.egg-info
