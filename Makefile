# `make demo` and `make test` set themselves up: they create .venv and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/demo

METHODS := no_filter,demo_clip30,demo_negcliploss30,demo_negcliploss_normsim30,demo_density30,demo_metaclip30,dfn_30pct
SHOWN   := filter_english,filter_caption_words,filter_caption_chars,filter_min_side,filter_aspect_ratio,demo_negcliploss30,demo_density30,demo_metaclip30

.PHONY: demo demo-methods readme-figures test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/winnow demo --out $(OUT)

# The curation methods side by side at one subset size (30% of the pool), 3 seeds each (reuses what `make demo` did)
demo-methods: $(STAMP)
	$(BIN)/winnow demo --out $(OUT) --set "demo.train=[$(METHODS)]" --set "demo.filters=[$(SHOWN)]"

# Record the last demo's figures (benchmarks/results/demo.json) and rewrite the README's block of them
readme-figures: $(STAMP)
	$(BIN)/python -m winnow.workflows.readme $(OUT)

test: $(STAMP)  # lint, the fast tier (unit tests, under a minute), then the end-to-end tier; two processes each
	$(BIN)/ruff check .
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
