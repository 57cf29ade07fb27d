# make demo: start the app.  make test: run the tests.  Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv browser bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# Debian's Chromium and a Korean font for the end-to-end browser test (skipped with a notice where it cannot be installed).
browser:
	@command -v chromium >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-nanum >/dev/null) ) || \
	  echo "note: chromium not installed; the browser test will be skipped"

demo: venv
	$(BIN)/streamlit run app.py

test: venv browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	$(BIN)/python benchmarks/encode.py

clean:
	rm -rf $(VENV) .pytest_cache
