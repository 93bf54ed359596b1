# vlmlab: `make demo` runs the main job end to end; `make test` runs the test suite.
# Both create or refresh .venv first, so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# the image every k8s/ manifest names; a placeholder registry: `make image IMAGE=your.registry/...`
IMAGE ?= registry.example.com/vlmlab/vlmlab:$(VERSION)

.PHONY: setup demo test bench lint image

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the releases this project is tested with
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	# headless Chromium + its driver for the search page test (Debian packages; no browser download)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)
	touch $(STAMP)

demo: setup
	$(PY) -m pipelines.demo --out demo_out

test: setup
	$(PY) -m pytest -q --durations=25

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check .

# the KubeRay image (Dockerfile): code and every dependency, so jobs install nothing at run time
image:
	docker build -t $(IMAGE) .
