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
