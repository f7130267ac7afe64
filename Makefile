# lightning_sp — every target sets up .venv on first use (pip install -e '.[dev]'), then does its job.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EVAL_STAMP := $(VENV)/.installed-eval
VARIANT ?= pooling
ARGS ?=
PYTEST_ARGS ?=
RUN ?=
ABLATE ?= default
BENCH ?= synthetic

.PHONY: help setup train data tokenizer encoder lint test bench bench-gpu tensorboard clean notebook ablate eval

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The suite also runs real lmms-eval (tests/test_lmms_eval_cli.py): `make test` adds the `eval` extra, which
# `make train` does not need. pip resolves it with our pins (transformers < 5), not lmms-eval's newest wishes.
$(EVAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,eval]'
	@touch $(EVAL_STAMP)

setup: $(STAMP) ## create .venv and install the package with its dev extras

train: $(STAMP) ## train the embedded default: make train VARIANT=pooling|mlp|cropping ARGS="trainer.max_steps=50"
	$(PY) -m lightning_sp train variant=$(VARIANT) $(ARGS)

data: $(STAMP) ## generate + shard the synthetic spatial-VQA data (train does this when missing)
	$(PY) -m lightning_sp prepare-data $(ARGS)

tokenizer: $(STAMP) ## rebuild the shipped tokenizer in data/tokenizer and its Llama-3 / Qwen2 chat variants (data/tokenizer_llama3, _qwen2)
	$(PY) -m lightning_sp.data.tokenizer --out data/tokenizer
	$(PY) -m lightning_sp.data.chat_tokenizers --base data/tokenizer --out-root lightning_sp/shipped/data

encoder: $(STAMP) ## re-pretrain the shipped tiny vision encoder in data/encoder (contrastive + patch places, synthetic scenes; ~5 min)
	$(PY) -m lightning_sp.pretrain_encoder --out data/encoder --position-weight 1.0 model.vision.patch_size=28 $(ARGS)

lint: $(STAMP) ## ruff: lint and formatting check (pyproject [tool.ruff]); `.venv/bin/ruff format .` fixes the formatting
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(EVAL_STAMP) ## run the test suite on CPU (nothing downloaded; installs the eval extra: lmms-eval)
	$(PY) -m pytest $(PYTEST_ARGS)

ablate: $(STAMP) ## run a study's arms x seeds (default: mlp/pooling/cropping x 2, ~55 min), write runs/ablate/<study>/results.md+csv+png: make ablate ABLATE=arms ARGS="trainer.max_steps=20"
	$(PY) -m lightning_sp ablate study=$(ABLATE) $(ARGS)

eval: $(STAMP) ## evaluate a run: make eval RUN=runs/pooling/<stamp> BENCH=synthetic|pope|vqa ARGS="questions=F.jsonl image_root=DIR"
	@test -n "$(RUN)" || { echo "usage: make eval RUN=<run dir or .ckpt> BENCH=synthetic|pope|vqa [ARGS=...]" >&2; exit 2; }
	$(PY) -m lightning_sp eval ckpt=$(RUN) benchmark=$(BENCH) $(ARGS)

bench: $(STAMP) ## CPU benchmarks: projector vs Conv2d, SP vs MLP step, input pipeline vs LLaVA, length grouping, step/memory scaling (~7-8 min on 2 cores) -> benchmarks/RESULTS.md
	$(PY) benchmarks/projector_bench.py --write benchmarks/RESULTS.md
	$(PY) benchmarks/step_bench.py --write benchmarks/RESULTS.md
	$(PY) benchmarks/input_bench.py --write benchmarks/RESULTS.md
	$(PY) benchmarks/length_group_bench.py --write benchmarks/RESULTS.md
	$(PY) benchmarks/scaling_bench.py --write benchmarks/RESULTS.md

bench-gpu: $(STAMP) ## on a GPU: 7B-shape LoRA train step (step time, tokens/s, memory, MFU): make bench-gpu ARGS="--batch 8" -> benchmarks/RESULTS.md
	$(PY) benchmarks/gpu_step_bench.py --write benchmarks/RESULTS.md $(ARGS)

tensorboard: $(STAMP) ## TensorBoard on runs/
	$(VENV)/bin/tensorboard --logdir runs

notebook: $(STAMP) ## execute notebooks/attention_maps.ipynb on the newest run (or RUN=dir) -> <run>/attention_maps.ipynb
	$(PY) -m lightning_sp.notebook notebooks/attention_maps.ipynb $(if $(RUN),--run-dir $(RUN))

clean: ## remove generated data and runs (keeps .venv and the shipped tokenizer)
	rm -rf runs data/synthetic data/synthetic-* data/shards
