# Two entry points: `make serve` and `make test`. Each prepares everything it needs on its own.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SAMPLES := data/samples/manifest.csv
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test setup samples lint clean-venv

setup: $(STAMP)

# The venv is rebuilt when the pinned requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing pinned dependencies into $(VENV) (first run: 5-15 min, ~7 GB)"
	$(PY) -m pip install --quiet --upgrade "pip<25" wheel
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

$(SAMPLES): $(STAMP)
	@echo ">> generating sample studies in data/samples"
	$(VENV)/bin/xai data make-brain --n 8 --seed 7 --out data/samples

samples: $(SAMPLES)

serve: $(STAMP) $(SAMPLES)
	$(VENV)/bin/xai serve --host $(HOST) --port $(PORT) --studies data/samples

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
