# The two commands of the README: `make bench` and `make test` each do all the set-up on a
# fresh machine (a .venv/ with the pinned requirements and an editable build of lvopt).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP_DEPS := $(VENV)/.deps-stamp
STAMP_BENCH := $(VENV)/.bench-stamp
NATIVE_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
STAMP_BUILD := $(VENV)/.build-stamp
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: experiment dev test bench bench-pytest sanitize native-test clean wheel lint format

# Files the formatters own (ruff format, clang-format): the files and directories listed in
# .ci/formatted-files.txt, as git sees them (tracked or new, not ignored: no build outputs).
FORMATTED := $(shell git ls-files --cached --others --exclude-standard -- $$(grep -v '^[[:space:]]*\(\#\|$$\)' .ci/formatted-files.txt))
FORMATTED_PY := $(filter %.py,$(FORMATTED))
FORMATTED_C := $(filter %.cpp %.h %.cu %.cuh,$(FORMATTED))

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP_DEPS): requirements-dev.txt | $(VPY)
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

$(STAMP_BENCH): requirements-bench.txt | $(STAMP_DEPS)
	$(VPY) -m pip install -q -r requirements-bench.txt || echo "bench extras not installed; the bench reports the missing anchors"
	touch $@

# Editable build: lvopt/_C*.so lands next to the sources; rebuilt when a native source changes.
$(STAMP_BUILD): $(STAMP_DEPS) $(NATIVE_SOURCES)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

dev: $(STAMP_BUILD)

test: $(STAMP_BUILD)
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP_BUILD) $(STAMP_BENCH)
	$(VPY) -m lvopt bench $(BENCH_ARGS)

bench-pytest: $(STAMP_BUILD)
	$(VPY) -m pytest benchmarks --benchmark-json=bench-out/pytest-benchmark.json

# Native test executable and AddressSanitizer/UBSan build of the CPU kernels (CMakeLists.txt).
native-test: $(STAMP_DEPS)
	cmake -S . -B build-native -G Ninja -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build build-native
	./build-native/lvopt_native_test

sanitize: $(STAMP_DEPS)
	cmake -S . -B build-asan -G Ninja -DLVOPT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build build-asan
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ./build-asan/lvopt_native_test

# Lint (pyproject.toml [tool.ruff]) on the whole tree; format check (ruff format, .clang-format)
# on the files of .ci/formatted-files.txt. `make format` formats those files.
lint: $(STAMP_DEPS)
	$(VENV)/bin/ruff check --no-cache .
	$(if $(FORMATTED_PY),$(VENV)/bin/ruff format --no-cache --check $(FORMATTED_PY))
	$(if $(FORMATTED_C),$(VENV)/bin/clang-format --dry-run -Werror $(FORMATTED_C))

format: $(STAMP_DEPS)
	$(if $(FORMATTED_PY),$(VENV)/bin/ruff format --no-cache $(FORMATTED_PY))
	$(if $(FORMATTED_C),$(VENV)/bin/clang-format -i $(FORMATTED_C))

wheel: $(STAMP_DEPS)
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build build-native build-asan dist *.egg-info lvopt/_C*.so $(STAMP_BUILD)

# LV-rule experiment (experiments/lv_rule, issues #8 and #16): the coordinate check of the
# sweep's model, the controlled synthetic sweep (resumable; CPU, one thread), then its analysis.
# Not part of `make test` or CI. The real-corpus sweep (second check) is experiments/lv_rule/corpus.py.
experiment: $(STAMP_BUILD)
	$(VPY) -m pip install -q -r experiments/lv_rule/requirements.txt
	$(VPY) experiments/lv_rule/coord.py --V 16
	$(VPY) experiments/lv_rule/coord.py --V 65536
	$(VPY) experiments/lv_rule/run.py
	$(VPY) experiments/lv_rule/analyze.py
