# The two commands of the README, and the steps they are made of. Each step is
# idempotent: a second `make test` installs nothing and rebuilds only what changed.
#   make run    set up, build, run the main job on the bundled default
#   make test   set up, build, run every C++ and Python test, the fuzz smoke
#               runs and the sanitizer subset
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
BUILD_DIR := build/py
JOBS      ?= $(shell nproc)
DEBS      := nlohmann-json3-dev libsentencepiece-dev libgtest-dev ccache cmake g++ python3-venv
# libFuzzer and the ASan/UBSan runtimes, for the fuzz targets and sanitizer runs.
FUZZ_DEBS := clang libclang-rt-14-dev ninja-build
FUZZ_SECONDS ?= 60
# make test fuzzes from a fixed seed, so a failure there comes from the change
# under test, not from the draw; make fuzz draws a new seed each run.
FUZZ_SEED ?= 1
STAMP     := $(VENV)/.mola-requirements

export CMAKE_BUILD_PARALLEL_LEVEL := $(JOBS)
export CCACHE_SLOPPINESS := pch_defines,time_macros,include_file_mtime,include_file_ctime

.PHONY: help run test setup install-debs install-python build test-cpp test-python bench clean \
        install-fuzz-debs fuzz test-fuzz test-sanitize test-sanitize-fast gpu-debs

help:
	@echo "make run    - set up, build, fine-tune the bundled tiny llama on ScienceQA with MoLA, analyse it, write a report"
	@echo "make test   - set up, build and run the C++ (ctest) and Python (pytest) tests"
	@echo "make bench  - the CPU layer benchmark (bench/layer.py), JSON to bench/results/"
	@echo "make fuzz   - fuzz the safetensors, config.json, recipe and preset readers, FUZZ_SECONDS (60) each"
	@echo "make test-sanitize - the C++ library and tests under ASan+UBSan (~30 min of 2-core CPU)"
	@echo "make gpu-debs - download the Debian packages .ci/gpu needs on a GPU machine into .debs/gpu"

setup: install-debs install-python

# Debian packages, only those missing (root, or sudo when there is one).
install-fuzz-debs: DEBS := $(FUZZ_DEBS)
install-debs install-fuzz-debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# What .ci/gpu builds with on a GPU machine that has no package registry: the
# C++ dependencies as .deb files (and pkg-config), carried there and unpacked
# into a prefix. Downloaded, not installed.
GPU_DEBS := nlohmann-json3-dev libsentencepiece-dev libsentencepiece0 pkgconf pkgconf-bin libpkgconf3
gpu-debs:
	mkdir -p .debs/gpu
	cd .debs/gpu && apt-get download $(GPU_DEBS)
	@ls -1 .debs/gpu

# The virtual environment with the pinned requirements, redone when they change.
install-python: $(STAMP)
$(STAMP): requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	@touch $@

# mola itself: the C++ library, its tests and the Python package, from one CMake
# build, redone only when a source of it changed (the stamp lives in the build).
SOURCES := CMakeLists.txt pyproject.toml \
  $(shell find cmake include src kernels python tests/cpp examples/cpp -type f \
            -not -name '*.pyc' 2>/dev/null)
BUILD_STAMP := $(BUILD_DIR)/.mola-installed

build: setup $(BUILD_STAMP)
$(BUILD_STAMP): $(SOURCES) $(STAMP)
	$(PIP) install -q --no-build-isolation --no-deps \
	  -C cmake.define.MOLA_BUILD_TESTS=ON -C cmake.define.MOLA_BUILD_EXAMPLES=ON \
	  -C build.verbose=false .
	@touch $@

test-cpp: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS) --no-tests=error

test-python: build
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider python

# Reliability (docs/design.md, Reliability): each fuzz target over its committed corpus, then
# fuzzed FUZZ_SECONDS, two at a time; the torch-free C++ tests under ASan+UBSan.
test-fuzz: install-fuzz-debs
	$(MAKE) -C tests/fuzz -j $(JOBS) all
	$(MAKE) -C tests/fuzz replay
	$(MAKE) -C tests/fuzz run FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_SEED=$(FUZZ_SEED) FUZZ_JOBS=2

fuzz: FUZZ_SEED := 0
fuzz: test-fuzz

test-sanitize-fast: install-fuzz-debs
	$(MAKE) -C tests/fuzz -j $(JOBS) sanitize-fast

# The whole C++ library and its tests under ASan+UBSan (build/sanitize).
test-sanitize: setup install-fuzz-debs
	$(MAKE) -C tests/sanitize full JOBS=$(JOBS)

test: test-cpp test-python test-sanitize-fast test-fuzz

# The main job: MoLA (preset 2468 over the 5 layers, top-2) on the bundled
# pretrained tiny llama, ScienceQA train -> test, the analysis of the trained
# adapter on the test split (RUN_OUT/analysis), then the report, which links to it.
RUN_RECIPE ?= configs/recipes/tiny/scienceqa-2468.json
RUN_OUT    ?= out/tiny/scienceqa-2468
RUN_DATA   ?= data/tasks/scienceqa/test.jsonl
run: build
	@start=$$(date +%s); \
	$(PY) -m mola train $(RUN_RECIPE) --set output_dir=$(RUN_OUT) --set train.resume=true; \
	$(PY) -m mola analyze $(RUN_OUT)/adapter --data $(RUN_DATA) --max-examples 200; \
	$(PY) -m mola report $(RUN_OUT); \
	echo "make run: $$(( $$(date +%s) - start )) s; open $(RUN_OUT)/report.html"

bench: build
	$(PY) bench/layer.py

clean:
	rm -rf build
