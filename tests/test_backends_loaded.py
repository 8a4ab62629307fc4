"""The backends this build and machine must load, asserted once.

Backend tests skip what a machine cannot run, so a build that silently lost a family (a failed
CUDA compile, a missing extension symbol, torch without Triton) would otherwise pass as "all
skipped". What must load follows from the generated manifest (the kernel families compiled into
natten._C) and from the device: a family's backend loads wherever its GPUs are present."""

import importlib.util

import pytest
import torch

pytest.importorskip("natten._C")

from natten import backends  # noqa: E402
from natten.backends.base import manifest_rows  # noqa: E402

# family in the manifest -> (backend name, device type, lowest compute capability)
FAMILIES = {
    "cpu": ("cpu", "cpu", None),
    "reference": ("reference", "cuda", (0, 0)),
    "sm80": ("cutlass-fna", "cuda", (8, 0)),
    "sm90": ("hopper-fna", "cuda", (9, 0)),
}


def expected_backends():
    """{device type: backend names that must load}."""
    families = {row[0] for row in manifest_rows()}
    unknown = families - set(FAMILIES)
    assert not unknown, f"manifest families {sorted(unknown)} have no expectation here: add them to FAMILIES"
    gpu = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if gpu else None
    expected = {"cpu": set(), "cuda": set()}
    for family in families:
        name, device, lowest = FAMILIES[family]
        if device == "cpu" or (gpu and capability >= lowest):
            expected[device].add(name)
    if gpu and importlib.util.find_spec("triton") is not None:
        expected["cuda"].add("flex-fna")
    return expected


def test_manifest_matches_the_torch_build():
    families = {row[0] for row in manifest_rows()}
    assert "cpu" in families, "every build compiles the CPU kernels"
    if torch.version.cuda is not None and torch.cuda.is_available():
        # setup.py builds for the visible GPUs when torch has CUDA, and a kernel filter must keep a
        # reference kernel: a CUDA machine's build without one lost its CUDA kernels.
        assert "reference" in families, (
            "torch has CUDA and a GPU is visible, but this build of natten._C has no CUDA kernels "
            "(rebuild on this machine: python setup.py build_ext --inplace)")


def test_expected_backends_load():
    expected = expected_backends()
    for device, names in expected.items():
        loaded = set(backends.names_for_device(device))
        missing = names - loaded
        assert not missing, (f"this build and machine must load {sorted(names)} on {device}, but "
                             f"{sorted(missing)} did not load (loaded: {sorted(loaded)})")
    assert backends.names_for_device("cpu") == ["cpu"]
