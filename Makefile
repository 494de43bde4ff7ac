# edge-agent developer targets. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# pixeltable-yolox is the upstream YOLOX used as the reference in tests and as the
# architecture source of the build scripts; its torchvision pin breaks beside the CPU
# torch, so it goes in without dependencies (the build extra carries what it needs).
YOLOX_REF := pixeltable-yolox==0.4.3

.PHONY: setup setup-build test lint format demo bench models clean

setup: $(VENV)/.runtime-installed

$(VENV)/.runtime-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[tflite,onnx,dev]'
	touch $@

setup-build: $(VENV)/.build-installed

$(VENV)/.build-installed: $(VENV)/.runtime-installed
	$(PIP) install -e '.[tflite,onnx,dev,build]'
	$(PIP) install --no-deps $(YOLOX_REF)
	touch $@

test: setup-build
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy agent runtimes models provisioning fleet tests bench

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The main job: the agent on the bundled model and clip, talking to a local mosquitto
# that the demo starts on a free loopback port (installed with apt when missing).
demo: setup
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
		(apt-get update -qq && apt-get install -y -qq mosquitto)
	$(VENV)/bin/edge-agent demo --seconds $(or $(DEMO_SECONDS),20)

bench: setup
	$(VENV)/bin/edge-agent bench detect --runs 100

models: setup-build
	$(PY) -m models.scripts.build_yolox

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache out
