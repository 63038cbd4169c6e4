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

# DVC's plots page loads Vega from a CDN, so offline its charts stay blank. This page carries
# Vega, Vega-Lite and Vega-Embed from package-lock.json inline; .dvc/config points DVC at it.
PLOTS_PAGE := .dvc/plots/offline.html
VEGA := vega/build/vega.min.js vega-lite/build/vega-lite.min.js vega-embed/build/vega-embed.min.js

$(PLOTS_PAGE): package-lock.json
	npm ci --no-audit --no-fund --silent
	mkdir -p $(dir $@)
	{ echo '<!DOCTYPE html><html><head><meta charset="utf-8"><title>DVC plots</title>'; \
	  for lib in $(VEGA); do echo '<script>'; cat node_modules/$$lib; echo '</script>'; done; \
	  echo '<script>const embed = vegaEmbed; vegaEmbed = (el, spec, options) =>'; \
	  echo '  embed(el, spec, {renderer: "svg", ...options});</script>'; \
	  echo '<style>table { border-spacing: 15px; }</style></head><body>'; \
	  echo '{plot_divs}</body></html>'; } > $@.tmp
	mv $@.tmp $@

install: $(STAMP) $(PLOTS_PAGE)

# The stages call `python -m pipeline.<stage>`: the venv goes first on PATH.
repro: $(STAMP) $(PLOTS_PAGE)
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

test: $(STAMP) $(PLOTS_PAGE)
	PATH="$(BIN):$$PATH" python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

# Refreshes the exact versions after a deliberate upgrade (`pip install -U ...` in the venv).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock
