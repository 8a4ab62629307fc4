"""The backends this build and machine must load, asserted once.

Backend tests skip what a machine cannot run, so a build that silently lost a family (a failed
CUDA compile, a missing extension symbol, torch without Triton) would otherwise pass as "all
skipped". What must load follows from the generated manifest (the kernel families compiled into
natten._C, and the compute capabilities each was compiled for) and from the device: a family's
backend loads wherever the build compiled it for the GPU present."""

import importlib.util

import pytest
import torch

pytest.importorskip("natten._C")

from natten import backends  # noqa: E402
from natten.backends.base import manifest_rows  # noqa: E402

def expected_backends():
    """{device type: backend names that must load}: the backend of every family in the manifest
    (autogen/registry.py names it) wherever the build compiled that family for this GPU."""
    import natten._manifest as manifest
    from autogen import registry

    families = {f.name: f for f in registry.FAMILIES}
    built = {row[0] for row in manifest_rows()}
    unknown = built - set(families)
    assert not unknown, f"manifest families {sorted(unknown)} are not in autogen/registry.py"
    gpu = torch.cuda.is_available()
    capability = ".".join(map(str, torch.cuda.get_device_capability())) if gpu else None
    expected = {"cpu": set(), "cuda": set()}
    for name in built:
        family = families[name]
        if not family.cuda:
            expected["cpu"].add(family.backend)
        elif gpu and capability in family.targets(manifest.ARCHS.get(name, ())):
            expected["cuda"].add(family.backend)
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
