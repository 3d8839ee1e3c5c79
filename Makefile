# Two commands on a fresh machine: `make demo`, then `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench bench-smoke clean

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

# The whole suite. The browser test of `memedit report` (tests/test_report.py) drives a Chromium through Playwright
# (installed with the test extras); it finds `chromium` or `chromium-browser` on PATH, or the one MEMEDIT_CHROMIUM
# names. Without one it is skipped, and -rs prints the line saying so: `sudo apt-get install chromium` first (as
# .ci/run does) to run all of it.
test: install
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -m pytest -rs tests

bench: install
	$(BIN)/python benchmarks/bench_lookup.py

# Every script in benchmarks/ at tiny sizes (--smoke), so none can crash unseen; baselines.py is a module that
# bench_edit.py and bench_continual.py import. What they print is not a measurement.
bench-smoke: install
	@for f in benchmarks/*.py; do \
		[ "$$f" = benchmarks/baselines.py ] && continue; \
		echo "== $$f --smoke"; start=$$(date +%s); \
		$(BIN)/python $$f --smoke || { echo "== $$f --smoke FAILED"; exit 1; }; \
		echo "== $$f --smoke: $$(( $$(date +%s) - start )) s"; \
	done

clean:
	rm -rf $(VENV) build *.egg-info
