"""The generator: deterministic output, filters, per-family targets, and tables and manifest that
agree with what is built and carry the instantiation key by name."""

import dataclasses
import importlib
import math

import pytest

from autogen import generate, registry


def _family(name):
    return next(f for f in registry.FAMILIES if f.name == name)


def test_render_is_deterministic():
    kernels = registry.kernels(True)
    assert generate.render(kernels) == generate.render(registry.kernels(True))


def test_cpu_build_has_every_cpu_instantiation_and_no_cuda():
    kernels = registry.kernels(False)
    assert {k.family.name for k in kernels} == {"cpu"}
    assert len(kernels) == len(registry.CPU_OPS) * 3 * 4
    names = [k.name for k in kernels]
    assert len(set(names)) == len(names)
    assert "fna_fwd_2d_bf16_cpu" in names


def test_filter_narrows_cuda_families_only():
    kernels = registry.kernels(True, "reference:bf16:*:2")
    cuda = [k for k in kernels if k.family.cuda]
    assert {(k.key.rank, k.key.dtype) for k in cuda} == {(2, "bfloat16")}
    assert len(cuda) == len(registry.REFERENCE_OPS)
    assert sum(not k.family.cuda for k in kernels) == len(registry.kernels(False))
    assert not [k for k in registry.kernels(True, "nothing:*") if k.family.cuda]


def test_tables_and_manifest_list_exactly_the_translation_units():
    kernels = registry.kernels(True, "reference:float16:*:1,reference:float32:*:3")
    files = generate.render(kernels)
    units = generate.sources(files)
    assert len(units) == len(kernels)
    table = files[generate.OUT_DIR / "dispatch_reference.h"]
    for k in kernels:
        if k.family.name == "reference":
            assert f"&{k.op.function}<{k.key.rank}, {k.cpp_type}>" in table
    assert "<2, __half>" not in table
    manifest = files[generate.MANIFEST]
    namespace = {}
    exec(manifest, namespace)
    assert list(namespace["INSTANTIATIONS"]) == [dataclasses.astuple(k.key) for k in kernels]
    assert namespace["Key"]._fields == registry.KEY_FIELDS


def test_runtime_manifest_matches_the_build():
    manifest = importlib.import_module("natten._manifest")
    from natten import _C

    built = registry.kernels(bool(_C.with_cuda))
    cpu = {dataclasses.astuple(k.key) for k in built if k.family.name == "cpu"}
    assert cpu <= set(manifest.INSTANTIATIONS)


def test_tiled_family_instantiates_each_head_dim_and_tile_pair():
    kernels = [k for k in registry.kernels(True, "sm80:bf16:64:2") if k.family.name == "sm80"]
    fwd = [k for k in kernels if k.op.name == "fna_fwd"]
    assert {(k.key.head_dim, k.key.rank, k.key.dtype) for k in kernels} == {(64, 2, "bfloat16")}
    assert {(k.key.q_tile, k.key.kv_tile) for k in fwd} == set(registry.SM80_OPS[0].tiles[2])
    k = next(k for k in fwd if k.key.q_tile == (8, 16))
    assert k.name == "fna_fwd_2d_bf16_hd64_q8x16_kv8x8_sm80"
    files = generate.render(kernels)
    text = files[generate.OUT_DIR / f"{k.name}.cu"]
    assert "template void fna_forward<2, __nv_bfloat16, 64, Box<8, 16>, Box<8, 8>>(" in text
    table = files[generate.OUT_DIR / "dispatch_sm80.h"]
    assert table.count("&fna_forward<") == len(fwd)
    # The key's fields are carried by name into every row of the table.
    row = ("{/*rank*/ 2, /*dtype*/ DType::kBFloat16, /*head_dim*/ 64, /*q_tile*/ {8, 16, 1}, "
           "/*kv_tile*/ {8, 8, 1}}, &fna_forward<2, __nv_bfloat16, 64, Box<8, 16>, Box<8, 8>>")
    assert row in table


def test_kernel_key_is_the_registry_key_less_family_and_op():
    text = generate.render(registry.kernels(False))[generate.OUT_DIR / generate.KERNEL_KEY]
    struct = text[text.index("struct KernelKey {"):text.index("};", text.index("struct KernelKey {"))]
    declared = [line.split()[-1].rstrip(";").split("[")[0] for line in struct.splitlines()[1:]]
    assert declared == [f for f in registry.KEY_FIELDS if f not in ("family", "op")]
    # A lookup miss names the dtype and the tile shapes in words.
    for words in ('"rank "', "dtype_name(k.dtype)", '", head dim "', '", query box "', '", key box "'):
        assert words in text


def test_each_family_builds_only_for_the_capabilities_it_runs_on():
    def families(capabilities):
        return {k.family.name for k in registry.kernels(True, capabilities=capabilities)}

    assert families(["7.5"]) == {"cpu", "reference"}
    assert families(["8.0"]) == families(["8.6"]) == {"cpu", "reference", "sm80"}
    assert families(["9.0"]) == {"cpu", "reference", "sm80", "sm90"}
    assert _family("sm90").targets(["8.0", "8.6", "9.0", "10.0"]) == ["9.0"]
    assert _family("sm80").targets(["7.5", "8.0", "9.0", "12.0"]) == ["8.0", "9.0", "12.0"]


def test_manifest_records_the_targets_built():
    kernels = registry.kernels(True, capabilities=["8.0", "9.0"])
    namespace = {}
    exec(generate.render(kernels, ("8.0", "9.0"))[generate.MANIFEST], namespace)
    assert namespace["ARCHS"] == {"reference": ("8.0", "9.0"), "sm80": ("8.0", "9.0"), "sm90": ("9.0",)}
    namespace = {}
    exec(generate.render(registry.kernels(False))[generate.MANIFEST], namespace)
    assert namespace["ARCHS"] == {}


def test_tiled_families_are_registered_for_the_one_pair_of_entry_points():
    kernels = registry.kernels(True, "reference:bf16:*:2,sm80:bf16:128:2,sm90:bf16:128:2")
    text = generate.render(kernels, ("9.0",))[generate.OUT_DIR / generate.TILED_FAMILIES]
    for family in ("sm80", "sm90"):  # both serve query ranges
        assert (f'{{"{family}", natten::{family}::dispatch::fna_fwd, natten::{family}::dispatch::fna_bwd, '
                f"&natten::{family}::fna_backward_workspace_floats, true}}") in text
    assert "reference" not in text.split("namespace natten::dispatch")[1]


def test_sm90_family_has_one_pair_per_rank_and_op():
    family = _family("sm90")
    assert family.tiled and family.backend == "hopper-fna" and family.archs == ("90a",)
    kernels = [k for k in registry.kernels(True) if k.family is family]
    per_op = len(family.ranks) * len(family.dtypes) * len(family.head_dims)
    for op in ("fna_fwd", "fna_bwd"):
        assert sum(k.op.name == op for k in kernels) == per_op
    names = {k.name for k in kernels if k.key.rank == 3 and k.key.dtype == "bfloat16" and k.key.head_dim == 128}
    assert names == {"fna_fwd_3d_bf16_hd128_q2x8x8_kv2x8x8_sm90", "fna_bwd_3d_bf16_hd128_q4x4x4_kv4x4x8_sm90"}
    # The backward's boxes are the kernel's: 64 queries against 128 keys.
    assert all(math.prod(k.key.q_tile) == 64 and math.prod(k.key.kv_tile) == 128
               for k in kernels if k.op.name == "fna_bwd")
    table = generate.render(kernels, ("9.0",))[generate.OUT_DIR / "dispatch_sm90.h"]
    assert table.count("&fna_forward<") == per_op and table.count("&fna_backward<") == per_op


@pytest.mark.parametrize("dtype,head_dim,q_tile,fwd,bwd", [
    ("bfloat16", 128, (8, 16), True, False),   # the backward's only pair is (8, 8)
    ("bfloat16", 128, (8, 8), True, True),
    ("float32", 128, (8, 16), False, False),   # 128 + 2 * 2 * 64 rows of 512 B: 192 KiB > 163
    ("float32", 128, (8, 8), True, True),      # 64 + 256 rows of 512 B + row table: 161.8 KiB
    ("float32", 64, (8, 16), True, False),     # 2 stages of 256 B rows: 128 + 256 rows, 96 KiB
    ("bfloat16", 256, (8, 16), False, False),  # 128-query boxes at head dim 256: no registers
    ("bfloat16", 256, (8, 8), True, False),    # head dim 256 has no backward
    ("float32", 256, (8, 8), False, False),    # 320 rows of 1 KiB
])
def test_sm80_instantiations_fit_registers_and_shared_memory(dtype, head_dim, q_tile, fwd, bwd):
    built = {(k.op.name, k.key.q_tile) for k in registry.kernels(True, f"sm80:{dtype}:{head_dim}:2")
             if k.family.name == "sm80"}
    assert (("fna_fwd", q_tile) in built) == fwd
    assert (("fna_bwd", q_tile) in built) == bwd
    assert math.prod(q_tile) in (64, 128)
