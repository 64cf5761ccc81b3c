# Two commands matter: `make train` (the whole pipeline) and `make test` (the suite CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# DVC stages call `eventcoder`, so the environment's bin goes first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install train test lint bench mlflow-ui clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: anything unpinned would pull the newest build with gigabytes of CUDA.
	$(BIN)/pip install --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(INSTALLED)

install: $(INSTALLED)

train: $(INSTALLED)
	$(BIN)/dvc repro

test: $(INSTALLED)
	$(BIN)/pytest

lint: $(INSTALLED)
	$(BIN)/ruff check eventcoder tests benchmarks data
	$(BIN)/ruff format --check eventcoder tests benchmarks data

bench: $(INSTALLED)
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/predict_speed.py

mlflow-ui: $(INSTALLED)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf checkpoints data/prepared models reports mlflow.db mlruns
