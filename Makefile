# Two commands on a fresh machine:
#   make demo   installs edgekd into .venv and runs the main job on the embedded default (Fashion-MNIST)
#   make test   installs edgekd (with test extras) into .venv and runs the test suite
# Both create their own virtual environment; nothing is installed by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch + torchvision are pinned as a matching pair: timm needs torchvision, and a torchvision built
# for another torch fails to import. Override on machines that want another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=
DEMO_BUDGET ?= 1ms

.PHONY: install demo test clean

$(BIN)/edgekd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(BIN)/edgekd

install: $(BIN)/edgekd

demo: install
	@test -d $(FASHION_MNIST) || { echo "Fashion-MNIST not found at $(FASHION_MNIST): sudo apt-get install dataset-fashion-mnist"; exit 2; }
	$(BIN)/edgekd compress --teacher resnet18 --random-init --data fashion-mnist --input-size 32 \
		--budget $(DEMO_BUDGET) --profile host --teacher-epochs 2 --epochs 3 --out runs/demo $(DEMO_ARGS)
	@echo "Open runs/demo/report.html, or run: $(BIN)/edgekd bench runs/demo"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
