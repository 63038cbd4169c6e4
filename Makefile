# Set-up and the everyday commands. `make repro` and `make test` install what is missing first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed

.PHONY: install repro recipe reproduce tune handback dashboard test lint lock

# Reinstalls only when the declared dependencies or the lock change.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The stages call `python -m pipeline.<stage>`: the venv goes first on PATH.
repro: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro

# Writes a recipe (recipes/NAME.yaml) into params.yaml: `make recipe NAME=fast`; no NAME lists them.
recipe: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pipeline.recipe $(NAME)

# An MLflow run's configuration back into params.yaml (`make reproduce RUN=<run id>`); then
# `make repro` re-creates the run.
reproduce: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pipeline.reproduce $(RUN)

# The Optuna sweep (sweep/dvc.yaml); never part of `make repro`. Then `make handback` writes the
# best values into params.yaml (`make handback TRIAL=N`: trial N's), and `make repro` trains and
# evaluates that configuration.
tune: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro sweep/dvc.yaml

handback: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pipeline.handback $(if $(TRIAL),--trial $(TRIAL))

# optuna-dashboard on the sweep's study (tune.storage, or OPTUNA_STORAGE): `make dashboard PORT=8080`.
dashboard: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pipeline.dashboard --port $(or $(PORT),8080)

test: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

# Refreshes the exact versions after a deliberate upgrade (`pip install -U ...` in the venv).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock
