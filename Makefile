# Set-up, build and checks. `make install` then `make test` is all a fresh machine needs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install build autogen cuda-compile-check test test-long bench-cpu bench gpu-check acceptance sanitize profile clean

# torch's CPU wheel is pinned only when torch is missing: a machine with a CUDA build keeps it.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install ninja pytest fvcore
	# CUTLASS/CuTe headers only: the package's Python dependencies are not needed to build.
	$(PIP) install --no-deps 'nvidia-cutlass>=4.2,<5'
	$(PIP) install --no-build-isolation --use-pep517 -e .

# Rebuild the extension in place after editing C++ (incremental with ninja).
build:
	$(PYTHON) setup.py build_ext --inplace

# Write the generated sources of a build into build/generated/ (setup.py does it by itself).
autogen:
	$(PYTHON) -m autogen

# CUDA kernels compiled by nvcc alone for the targets of each family: no GPU or CUDA torch needed.
cuda-compile-check:
	$(PYTHON) -m autogen.compile_check

test: cuda-compile-check
	$(PYTHON) -m pytest -q tests

test-long:
	NATTEN_LONG_TESTS=1 $(PYTHON) -m pytest -q tests

bench-cpu:
	$(PYTHON) benchmarks/cpu_speed.py

bench:
	$(PYTHON) benchmarks/gpu_bench.py

# compute-sanitizer (memcheck) over a small subset of the CUDA tests.
sanitize:
	compute-sanitizer --tool memcheck --error-exitcode 1 $(PYTHON) -m pytest -q -x \
		tests/test_cuda_fused.py -k "(cuda-reference or cuda-cutlass-fna or cuda-hopper-fna) and (test_dtypes or test_geometry_and_features)"
	compute-sanitizer --tool memcheck --error-exitcode 1 $(PYTHON) -m pytest -q -x \
		tests/test_cuda_tiled.py -k "((test_forward_only_family_small_cases or test_every_backward_tile_pair) and bfloat16) or test_hopper_deterministic_backward"
	compute-sanitizer --tool memcheck --error-exitcode 1 $(PYTHON) -m pytest -q -x \
		tests/test_cpu_unfused.py -k "cuda and (test_qk or test_rpb_gradient)"

# pytest-xdist, where installed, spreads the suite over processes that share the GPU: the
# compile-heavy tests (torch.compile, flex-fna) then run side by side.
XDIST = $(shell $(PYTHON) -c "import xdist" 2>/dev/null && echo "-n 8")

# On a GPU machine: build in place for the local GPU (no network needed), run every test, the
# sanitizer subset and the benchmark (its table last).
gpu-check: build
	$(PYTHON) -m pytest -q $(XDIST) tests
	$(MAKE) sanitize
	$(PYTHON) benchmarks/gpu_bench.py

# On a GPU machine with natten installed: profiler, tuning on P2/P3, torch.compile on CUDA, benchmark.
acceptance:
	bash benchmarks/gpu_acceptance.sh bench_out

profile:
	$(PYTHON) -m natten.profiler

clean:
	rm -rf build natten/*.so *.egg-info
