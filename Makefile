# Entry points: `make train` (a small CPU training run on the embedded corpus, tag $(TAG)), then `make sample`
# and `make eval` on its checkpoint, and `make test`. Each creates .venv and installs what it needs on a fresh
# machine (Python >= 3.10).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE_DIR ?= $(or $(NANOCHAT_BASE_DIR),$(HOME)/.cache/nanochat)
export NANOCHAT_BASE_DIR := $(BASE_DIR)
TAG ?= d4_cpu
PROMPT ?= def main(
EVALS ?= bpb,sample

.PHONY: setup train sample eval test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build is enough here, and pyproject's range then installs nothing larger
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Small CPU run: depth 4, width 128, 256-token context, 4096-token vocabulary: about 6 minutes on 2 cores.
train: setup
	$(PY) -m nanochat.dataset --default-corpus
	test -f $(BASE_DIR)/tokenizer/tokenizer.json || $(PY) -m scripts.tok_train --vocab-size 4096
	$(PY) -m scripts.base_train --device-type cpu --depth 4 --aspect-ratio 32 --head-dim 64 --max-seq-len 256 \
		--device-batch-size 16 --total-batch-size 4096 --num-iterations 300 --warmup-steps 10 \
		--eval-every 100 --eval-tokens 32768 --sample-every 100 --model-tag $(TAG) --overwrite

# Text from make train's checkpoint: make sample PROMPT="import os". The prompt reaches the shell as an
# environment variable, so quotes in it (PROMPT="it's") stay text.
sample: export PROMPT := $(PROMPT)
sample: setup
	$(PY) -m scripts.base_sample --device-type cpu --model-tag $(TAG) --prompt "$$PROMPT"

# Val bpb and samples of make train's checkpoint; EVALS=core,bpb,sample adds CORE (after
# `$(PY) -m scripts.base_eval --download-bundle`)
eval: setup
	$(PY) -m scripts.base_eval --device-type cpu --model-tag $(TAG) --eval $(EVALS)

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache
