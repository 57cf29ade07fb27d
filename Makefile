# make demo: start the app.  make test: run the tests.  Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv browser datasets bench clean

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

# Debian's Fashion-MNIST, which scripts/fashion_mnist.py and `koclip eval` read (/usr/share/datasets/fashion-mnist).
datasets:
	@test -d /usr/share/datasets/fashion-mnist || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) ) || \
	  echo "note: dataset-fashion-mnist not installed; scripts/fashion_mnist.py will say how to get it"

demo: venv
	$(BIN)/streamlit run app.py

test: venv browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: venv datasets
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	$(BIN)/python benchmarks/encode.py

clean:
	rm -rf $(VENV) .pytest_cache
