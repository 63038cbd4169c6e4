# Set-up and the everyday commands. `make repro` and `make test` install what is missing first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed

.PHONY: install repro recipe reproduce tune handback dashboard test test-prerequisites lint lock plots-page

# Reinstalls only when the declared dependencies or the lock change. uv installs the locked
# versions, compiled to bytecode as pip does (without it every process, with
# PYTHONDONTWRITEBYTECODE set, compiles TensorFlow and MLflow anew), in a fraction of pip's
# time (figures in benchmarks/README); pip installs uv.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint requirements.lock uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python \
	  --constraint requirements.lock --editable '.[dev]'
	touch $(STAMP)

# DVC's own plots page loads Vega from a CDN, so offline its charts stay blank. The committed
# .dvc/plots/offline.html (named in .dvc/config) carries Vega, Vega-Lite and Vega-Embed inline, so
# `dvc plots show` draws offline with no build step. `make plots-page` rebuilds it from the
# versions in package-lock.json (needs npm), after a deliberate upgrade.
PLOTS_PAGE := .dvc/plots/offline.html
VEGA := vega/build/vega.min.js vega-lite/build/vega-lite.min.js vega-embed/build/vega-embed.min.js

plots-page: package-lock.json
	npm ci --no-audit --no-fund --silent
	mkdir -p $(dir $(PLOTS_PAGE))
	{ echo '<!DOCTYPE html><html><head><meta charset="utf-8"><title>DVC plots</title>'; \
	  for lib in $(VEGA); do echo '<script>'; cat node_modules/$$lib; echo '</script>'; done; \
	  echo '<script>const embed = vegaEmbed; vegaEmbed = (el, spec, options) =>'; \
	  echo '  embed(el, spec, {renderer: "svg", ...options});</script>'; \
	  echo '<style>table { border-spacing: 15px; }</style></head><body>'; \
	  echo '{plot_divs}</body></html>'; } > $(PLOTS_PAGE).tmp
	mv $(PLOTS_PAGE).tmp $(PLOTS_PAGE)

# What the tests need besides Python and make, checked before anything is installed.
test-prerequisites:
	@missing=""; \
	command -v git >/dev/null || missing="$$missing git"; \
	{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 \
	  || missing="$$missing PostgreSQL's server (initdb, pg_ctl)"; \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	  || missing="$$missing Chromium"; \
	{ PATH="$$PATH:/usr/sbin"; command -v slurmctld && command -v munged; } >/dev/null 2>&1 \
	  || missing="$$missing Slurm and MUNGE (slurmctld, munged)"; \
	if [ -n "$$missing" ]; then echo "make test: missing$$missing; install with 'sudo" \
	  "apt-get install -y git postgresql chromium slurm-wlm munge' (README: Prerequisites)" >&2; \
	  exit 1; fi

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
# best values into params.yaml, and `make repro` trains and
# evaluates that configuration.
tune: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro sweep/dvc.yaml

handback: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pipeline.handback

# optuna-dashboard on the sweep's study (tune.storage, or OPTUNA_STORAGE): `make dashboard PORT=8080`.
dashboard: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pipeline.dashboard --port $(or $(PORT),8080)

test: test-prerequisites $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

# Refreshes the exact versions after a deliberate upgrade (`pip install -U ...` in the venv).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock
