# Set-up, build and checks. `make install` then `make test` is all a fresh machine needs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install build autogen autogen-check test test-long bench-cpu profile clean

# torch's CPU wheel is pinned only when torch is missing: a machine with a CUDA build keeps it.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install ninja pytest fvcore
	$(PIP) install --no-build-isolation -e .

# Rebuild the extension in place after editing C++ (incremental with ninja).
build:
	$(PYTHON) setup.py build_ext --inplace

autogen:
	$(PYTHON) -m autogen

autogen-check:
	$(PYTHON) -m autogen --check

test: autogen-check
	$(PYTHON) -m pytest -q tests

test-long: autogen-check
	NATTEN_LONG_TESTS=1 $(PYTHON) -m pytest -q tests

bench-cpu:
	$(PYTHON) benchmarks/cpu_speed.py

profile:
	$(PYTHON) -m natten.profiler

clean:
	rm -rf build natten/*.so *.egg-info
