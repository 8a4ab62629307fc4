"""`pytest` from the repository root runs tests/ (pytest.ini) against the natten package that
Python imports from here: this tree's, once its extension is built in place. Without a built
extension the run stops at once and says how to build it, instead of failing test by test.

The check looks for the files without importing natten: tests/conftest.py must set
NATTEN_POISON_OUTPUTS before the first import."""

import importlib.machinery
import importlib.util
import pathlib

import pytest


def _missing_build():
    spec = importlib.util.find_spec("natten")
    if spec is None or not spec.submodule_search_locations:
        return "the natten package is not importable"
    package = pathlib.Path(next(iter(spec.submodule_search_locations)))
    extension = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in package.glob(f"_C{suffix}")]
    if not extension:
        return f"natten._C is not built in {package}"
    if not (package / "_manifest.py").exists():
        return f"{package / '_manifest.py'} is missing (the build writes it next to natten._C)"
    return None


def pytest_configure(config):
    reason = _missing_build()
    if reason is not None:
        pytest.exit(f"{reason}: build the extension first, with `make build` (python setup.py build_ext "
                    "--inplace; NATTEN_CUDA_ARCH and NATTEN_KERNEL_FILTER choose the CUDA kernels), or "
                    "`make install` on a fresh machine", returncode=4)
