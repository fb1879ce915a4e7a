# The README's two commands: `make demo` (generate an image from the embedded default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= a red circle on a blue background

.PHONY: demo test

# torch 2.13.0 first and explicitly: a bare torch requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[export,dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sdrt generate "$(PROMPT)" -o image.png

test: $(VENV)/.installed
	$(PY) -m pytest

# Regenerates benchmarks/RESULTS.md: SD 1.5-architecture random checkpoint (built once), its bundle, then sdrt bench.
BENCH_DIR ?= bench-data
BENCH_ARGS ?= --runs 3 --sizes 512 -s 20
.PHONY: bench
bench: $(VENV)/.installed
	test -d $(BENCH_DIR)/sd15 || $(VENV)/bin/sdrt make-checkpoint $(BENCH_DIR)/sd15 --arch sd15
	test -d $(BENCH_DIR)/sd15-bundle || $(VENV)/bin/sdrt export $(BENCH_DIR)/sd15 $(BENCH_DIR)/sd15-bundle
	$(VENV)/bin/sdrt bench $(BENCH_DIR)/sd15-bundle --checkpoint $(BENCH_DIR)/sd15 $(BENCH_ARGS) \
	    --out $(BENCH_DIR)/out --results benchmarks/RESULTS.md
