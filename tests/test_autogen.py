"""The generator: deterministic output, filters, and tables that agree with what is built."""

import importlib

from autogen import generate, registry


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
    assert {(k.rank, k.dtype) for k in cuda} == {(2, "bfloat16")}
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
            assert f"&{k.op.function}<{k.rank}, {k.cpp_type}>" in table
    assert "<2, __half>" not in table
    manifest = files[generate.MANIFEST]
    namespace = {}
    exec(manifest, namespace)
    assert set(namespace["INSTANTIATIONS"]) == {
        (k.family.name, k.op.name, k.rank, k.dtype, k.head_dim, k.q_tile, k.kv_tile) for k in kernels}


def test_runtime_manifest_matches_the_build():
    manifest = importlib.import_module("natten._manifest")
    from natten import _C

    built = registry.kernels(bool(_C.with_cuda))
    assert {("cpu", k.op.name, k.rank, k.dtype) for k in built if k.family.name == "cpu"} <= {
        row[:4] for row in manifest.INSTANTIATIONS}


def test_tiled_family_instantiates_each_head_dim_and_tile_pair():
    kernels = [k for k in registry.kernels(True, "sm80:bf16:64:2") if k.family.name == "sm80"]
    fwd = [k for k in kernels if k.op.name == "fna_fwd"]
    assert {(k.q_tile, k.kv_tile) for k in fwd} == set(registry.SM80_OPS[0].tiles[2])
    assert {(k.head_dim, k.rank, k.dtype) for k in kernels} == {(64, 2, "bfloat16")}
    k = fwd[0]
    assert k.name == f"fna_fwd_2d_bf16_hd64_q{'x'.join(map(str, k.q_tile))}_kv{'x'.join(map(str, k.kv_tile))}_sm80"
    files = generate.render(kernels)
    text = files[generate.OUT_DIR / f"{k.name}.cu"]
    assert f"fna_forward<2, __nv_bfloat16, 64, Box<{', '.join(map(str, k.q_tile))}>" in text
    table = files[generate.OUT_DIR / "dispatch_sm80.h"]
    assert table.count("&fna_forward<") == len(fwd)
