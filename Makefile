# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: run test venv lint bench clean data

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/pyro-distill demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/svi_step.py
	$(BIN)/python benchmarks/conditioning.py

# Fashion-MNIST's four IDX files from Debian's package, into /usr/share/datasets/fashion-mnist/ (the loader's
# last search place). Installs as root or with passwordless sudo; otherwise prints the command and fails.
FASHION_DIR := /usr/share/datasets/fashion-mnist
FASHION_PKG := dataset-fashion-mnist
data:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] && [ -f $(FASHION_DIR)/train-labels-idx1-ubyte.gz ] \
	  && [ -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz ] && [ -f $(FASHION_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
	  echo "Fashion-MNIST already in $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update && apt-get install -y $(FASHION_PKG); \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo -n apt-get update && sudo -n apt-get install -y $(FASHION_PKG); \
	else \
	  echo "cannot install $(FASHION_PKG) (not root, no passwordless sudo). Run as root:"; \
	  echo "  apt-get update && apt-get install -y $(FASHION_PKG)"; \
	  echo "or put the four IDX .gz files in a directory and set PYRO_DISTILL_DATA=/that/directory"; \
	  exit 1; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache
