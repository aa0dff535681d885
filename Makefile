# `make demo` and `make test` set themselves up: they create .venv and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/demo

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/winnow demo --out $(OUT)

test: $(STAMP)  # the fast tier (unit tests, under a minute), then the end-to-end tier; two processes each
	$(BIN)/python -m pytest -q -ra -n 2 -m "not e2e and not gpu"
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile -m "e2e and not gpu"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_hostile.py
	$(BIN)/python benchmarks/bench_select.py
	$(BIN)/python benchmarks/bench_reshard.py
	$(BIN)/python benchmarks/bench_embed.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_dedup.py
	$(BIN)/python benchmarks/bench_dist.py
	$(BIN)/python benchmarks/bench_patchmix.py

clean:
	rm -rf runs .pytest_cache
