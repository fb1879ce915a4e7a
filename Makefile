# The README's two commands: `make demo` (generate an image from the embedded default model: the runtime alone, no
# torch) and `make test` (the exporter, torch and the test tools added to the same venv).
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= a red circle on a blue background
# torch from PyTorch's CPU wheel index: a bare torch requirement from PyPI pulls a multi-GB CUDA build. Empty
# (TORCH_INDEX=) takes torch from pip's own configuration alone. pip's other configured sources (find-links, extra
# indexes) still apply, so a machine with a local torch wheel installs it even where this index is unreachable.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# torch alone (--no-deps: only torch is looked up on its index); its dependencies come from PyPI with the next install
INSTALL_TORCH = -m pip install --quiet --no-deps $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
# optimum-intel's venv also takes torchvision (optimum-intel requires it): the one built for this torch, from the same
# index, or PyPI's newest would replace the CPU torch with the CUDA build it pins.
INSTALL_TORCH_AND_VISION = $(INSTALL_TORCH) torchvision==0.28.0

.PHONY: demo test test-slow demo-bundle

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per install, so `make demo` then `make test` adds to the same venv.
$(VENV)/.runtime-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.runtime-installed
	$(PY) $(INSTALL_TORCH)
	$(PY) -m pip install --quiet -e '.[export,dev]'
	touch $@

demo: $(VENV)/.runtime-installed
	$(VENV)/bin/sdrt generate "$(PROMPT)" -o image.png

# The tests a change is checked with; test-slow runs those marked slow (Ray Serve, the serving load test, the
# inpainting U-Net's cases, the slowest end-to-end exports): CI (.ci/run) runs both.
test: $(VENV)/.test-installed
	$(PY) -m pytest -m "not slow"

test-slow: $(VENV)/.test-installed
	$(PY) -m pytest -m slow

# Re-exports the shipped default model (demo/bundle/) from its checkpoint (demo/model/): after retraining it, or when
# tests/test_demo_model.py finds that the exporter now writes something else.
demo-bundle: $(VENV)/.test-installed
	$(PY) -m sdrt.demo.default_model_export

# Regenerates benchmarks/RESULTS.md: SD 1.5-architecture random checkpoint (built once), its sdrt bundle, the peers
# that run in venvs of their own (optimum-onnx and optimum-intel need transformers 4.x; OpenVINO GenAI) with their own
# exports (timed and measured by sdrt.benchmarks.peer_export; GenAI and optimum-intel run the same OpenVINO export),
# then sdrt bench. Takes about two hours on 2 cores; nothing here gates CI.
BENCH_DIR ?= bench-data
BENCH_ARGS ?= --runs 3 --sizes 512 -s 20
OPTIMUM_VENV ?= .venv-optimum
.PHONY: bench bench-build bench-peers bench-vendor
OPTIMUM_INTEL_VENV ?= .venv-optimum-intel
GENAI_VENV ?= .venv-genai

$(OPTIMUM_VENV)/.installed:
	python3 -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python $(INSTALL_TORCH)
	$(OPTIMUM_VENV)/bin/python -m pip install --quiet 'optimum-onnx[onnxruntime]' 'transformers<5' diffusers
	touch $@

bench: bench-bundle bench-peers
	$(VENV)/bin/sdrt bench $(BENCH_DIR)/sd15-bundle --checkpoint $(BENCH_DIR)/sd15 $(BENCH_ARGS) \
	    --optimum-python $(OPTIMUM_VENV)/bin/python --optimum-model $(BENCH_DIR)/sd15-optimum \
	    --optimum-intel-python $(OPTIMUM_INTEL_VENV)/bin/python --genai-python $(GENAI_VENV)/bin/python \
	    --openvino-model $(BENCH_DIR)/sd15-openvino \
	    --out $(BENCH_DIR)/out --results benchmarks/RESULTS.md --readme README.md

# Regenerates benchmarks/VENDOR.md: the fast modes against the OpenVINO team's own pipelines (and exact mode, the PSNR
# reference) as the bench's targets are set, 512², 20 steps, two interleaved rounds: about 30 minutes on 2 cores,
# against 80 for `make bench`'s every engine.
bench-vendor: bench-bundle bench-peers
	$(VENV)/bin/sdrt bench $(BENCH_DIR)/sd15-bundle --checkpoint $(BENCH_DIR)/sd15 --runs 2 --sizes 512 -s 20 \
	    --engines sdrt sdrt-deepcache sdrt-exact optimum-intel openvino-genai \
	    --optimum-intel-python $(OPTIMUM_INTEL_VENV)/bin/python --genai-python $(GENAI_VENV)/bin/python \
	    --openvino-model $(BENCH_DIR)/sd15-openvino --out $(BENCH_DIR)/vendor --results benchmarks/VENDOR.md

# The peers' venvs and their own exports of the bench checkpoint, each export once (its time and peak memory are
# recorded beside it, OUT.export.json, and reported by sdrt bench).
bench-peers: bench-bundle $(OPTIMUM_VENV)/.installed $(OPTIMUM_INTEL_VENV)/.installed $(GENAI_VENV)/.installed
	test -d $(BENCH_DIR)/sd15-optimum || $(PY) -m sdrt.benchmarks.peer_export onnx $(BENCH_DIR)/sd15 \
	    $(BENCH_DIR)/sd15-optimum --python $(OPTIMUM_VENV)/bin/python
	test -d $(BENCH_DIR)/sd15-openvino || $(PY) -m sdrt.benchmarks.peer_export openvino $(BENCH_DIR)/sd15 \
	    $(BENCH_DIR)/sd15-openvino --python $(OPTIMUM_INTEL_VENV)/bin/python

# OpenVINO GenAI's pipeline is C++ behind Python bindings: no torch, no transformers.
$(GENAI_VENV)/.installed:
	python3 -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -m pip install --quiet openvino-genai openvino-tokenizers numpy
	touch $@

# Without the CPU index (TORCH_INDEX=) torchvision comes from PyPI, built for the CUDA torch: beside a CPU torch it
# fails to import ("operator torchvision::nms does not exist") and takes transformers down with it; optimum-intel's
# export and pipeline run without it.
$(OPTIMUM_INTEL_VENV)/.installed:
	python3 -m venv $(OPTIMUM_INTEL_VENV)
	$(OPTIMUM_INTEL_VENV)/bin/python $(INSTALL_TORCH_AND_VISION)
	$(OPTIMUM_INTEL_VENV)/bin/python -m pip install --quiet 'optimum-intel[openvino]' 'transformers<5' diffusers
	$(if $(TORCH_INDEX),,$(OPTIMUM_INTEL_VENV)/bin/python -m pip uninstall --quiet --yes torchvision)
	touch $@

# Regenerates benchmarks/EXPORT.md: peak memory and time of `sdrt export` and `sdrt quantize` on the SD 1.5-architecture
# checkpoint beside optimum-intel's and optimum's exports of it, one at a time. About 15 minutes on 2 cores.
bench-build: $(VENV)/.test-installed $(OPTIMUM_VENV)/.installed $(OPTIMUM_INTEL_VENV)/.installed
	test -d $(BENCH_DIR)/sd15 || $(VENV)/bin/sdrt make-checkpoint $(BENCH_DIR)/sd15 --arch sd15
	$(PY) -m sdrt.benchmarks.build_memory $(BENCH_DIR)/sd15 $(BENCH_DIR)/build \
	    --optimum-intel-python $(OPTIMUM_INTEL_VENV)/bin/python --optimum-python $(OPTIMUM_VENV)/bin/python \
	    --out $(BENCH_DIR)/build.json --results benchmarks/EXPORT.md

# The SD 1.5-architecture random checkpoint (compute does not depend on weight values) and its bundle, quantized so
# that `auto` runs the int8 U-Net (by `sdrt export` itself where the quantize extra is installed), with DeepCache's
# passes for the fast preset (sdrt-deepcache): what every bench target measures; each step runs once.
.PHONY: bench-bundle bench-memory bench-scaling
bench-bundle: $(VENV)/.test-installed
	test -d $(BENCH_DIR)/sd15 || $(VENV)/bin/sdrt make-checkpoint $(BENCH_DIR)/sd15 --arch sd15
	test -d $(BENCH_DIR)/sd15-bundle || $(VENV)/bin/sdrt export $(BENCH_DIR)/sd15 $(BENCH_DIR)/sd15-bundle --deepcache-branch 0
	ls $(BENCH_DIR)/sd15-bundle/int8/vae_decoder-* >/dev/null 2>&1 || $(VENV)/bin/sdrt quantize $(BENCH_DIR)/sd15-bundle --size 256

# Regenerates benchmarks/MEMORY.md: peak RSS of every sdrt mode kept loaded and one model at a time against diffusers
# fp32, at 512x512; 2 steps, as peak memory does not depend on the step count.
bench-memory: bench-bundle
	$(VENV)/bin/sdrt bench $(BENCH_DIR)/sd15-bundle --checkpoint $(BENCH_DIR)/sd15 \
	    --engines sdrt sdrt-exact sdrt-low-memory sdrt-exact-low-memory diffusers-fp32 --runs 1 --sizes 512 -s 2 \
	    --out $(BENCH_DIR)/memory --results benchmarks/MEMORY.md

# Regenerates benchmarks/SCALING.md: sdrt and diffusers bf16 at 256, 512 and 768 px, batches 1, 2 and 4; 2 steps so
# that the 18 points fit in about 40 minutes on 2 cores.
bench-scaling: bench-bundle
	$(VENV)/bin/sdrt bench $(BENCH_DIR)/sd15-bundle --checkpoint $(BENCH_DIR)/sd15 \
	    --engines sdrt diffusers-bf16 --runs 1 --sizes 256 512 768 --batches 1 2 4 -s 2 \
	    --out $(BENCH_DIR)/scaling --results benchmarks/SCALING.md

# Regenerates benchmarks/SDXL.md and SDXL-1024.md (and EXPORT-SDXL.md): the SDXL base-architecture random checkpoint,
# sdrt's export of it and optimum-intel's (time and peak memory of each; the peer's in SDXL.md), then sdrt against diffusers bf16,
# optimum-intel and OpenVINO GenAI at 512² (with diffusers fp32 as the PSNR reference: sdrt's fp32 engine needs about
# 20 GiB for SDXL, over a 24 GB machine's budget) and 1024², 4 Euler steps, guidance 5 (SDXL's default), one run each
# as the figures are minutes long. About 90 minutes on 2 cores.
SDXL_BENCH_ARGS ?= --runs 1 -s 4 -g 5
SDXL_PEERS = --optimum-intel-python $(OPTIMUM_INTEL_VENV)/bin/python --genai-python $(GENAI_VENV)/bin/python \
    --openvino-model $(BENCH_DIR)/sdxl-build/optimum-openvino --checkpoint $(BENCH_DIR)/sdxl
.PHONY: bench-sdxl bench-turbo
bench-sdxl: $(VENV)/.test-installed $(OPTIMUM_INTEL_VENV)/.installed $(GENAI_VENV)/.installed
	test -d $(BENCH_DIR)/sdxl || $(VENV)/bin/sdrt make-checkpoint $(BENCH_DIR)/sdxl --arch sdxl
	test -d $(BENCH_DIR)/sdxl-build/bundle || $(PY) -m sdrt.benchmarks.build_memory $(BENCH_DIR)/sdxl \
	    $(BENCH_DIR)/sdxl-build --quantize-size 0 --results benchmarks/EXPORT-SDXL.md
	test -d $(BENCH_DIR)/sdxl-build/optimum-openvino || $(PY) -m sdrt.benchmarks.peer_export openvino $(BENCH_DIR)/sdxl \
	    $(BENCH_DIR)/sdxl-build/optimum-openvino --python $(OPTIMUM_INTEL_VENV)/bin/python
	$(VENV)/bin/sdrt bench $(BENCH_DIR)/sdxl-build/bundle $(SDXL_PEERS) $(SDXL_BENCH_ARGS) --sizes 512 \
	    --engines sdrt diffusers-fp32 diffusers-bf16 optimum-intel openvino-genai --reference diffusers-fp32 \
	    --out $(BENCH_DIR)/sdxl-512 --results benchmarks/SDXL.md
	$(VENV)/bin/sdrt bench $(BENCH_DIR)/sdxl-build/bundle $(SDXL_PEERS) $(SDXL_BENCH_ARGS) --sizes 1024 \
	    --engines sdrt diffusers-bf16 optimum-intel openvino-genai --out $(BENCH_DIR)/sdxl-1024 --results benchmarks/SDXL-1024.md

# Regenerates benchmarks/TURBO-{1,2,4}.md: one-, two- and four-step latency at 512², guidance 0, on SD 1.5's
# architecture with SD-Turbo's scheduler, exported as a user does (`sdrt export`: the int8 U-Net where it fits),
# against sdrt's fp32 engine and diffusers bf16, two runs each. About 25 minutes on 2 cores.
bench-turbo: $(VENV)/.test-installed
	test -d $(BENCH_DIR)/sd15-turbo || $(VENV)/bin/sdrt make-checkpoint $(BENCH_DIR)/sd15-turbo --arch sd15-turbo
	test -d $(BENCH_DIR)/sd15-turbo-bundle || $(VENV)/bin/sdrt export $(BENCH_DIR)/sd15-turbo $(BENCH_DIR)/sd15-turbo-bundle
	for steps in 1 2 4; do $(VENV)/bin/sdrt bench $(BENCH_DIR)/sd15-turbo-bundle --checkpoint $(BENCH_DIR)/sd15-turbo \
	    --engines sdrt sdrt-exact diffusers-bf16 --runs 2 --sizes 512 -s $$steps -g 0 --no-floor \
	    --out $(BENCH_DIR)/turbo-$$steps --results benchmarks/TURBO-$$steps.md || exit 1; done
