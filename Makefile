# Two commands do everything on a fresh machine:
#   make run    set up .venv if needed, run the default experiment (toy world, every editor) and its report
#   make test   set up .venv if needed, run the test suite
#   make wheel  build dist/oig-<version>-py3-none-any.whl (configs and toy models inside; pip install it anywhere)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.oig-installed

.PHONY: run test setup wheel train-toy clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,launchers,laion]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/oig-run experiment=toy_table hydra.sweep.dir=runs/toy_table
	$(BIN)/oig-report runs/toy_table --out runs/toy_table/report --html

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/pytest -q

wheel: $(STAMP)
	$(BIN)/pip wheel --no-deps --no-build-isolation -w dist .

train-toy: $(STAMP)
	$(BIN)/python -m oig.toy.train all

clean-runs:
	rm -rf runs multirun outputs
