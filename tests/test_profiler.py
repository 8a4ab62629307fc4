"""The profiler CLI, in-process and as `python -m natten.profiler`."""

import importlib
import io
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("natten._C")

from natten.flops import fna_flops  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _profiler_module():
    """The profiler of the natten under test: the source folder `profiler/` next to the imported
    natten package when there is one (an editable install of another checkout could map
    `natten.profiler` elsewhere), else the installed `natten.profiler`."""
    import natten

    root = os.path.dirname(os.path.dirname(os.path.abspath(natten.__file__)))
    if os.path.isfile(os.path.join(root, "profiler", "cli.py")):
        if root not in sys.path:
            sys.path.insert(0, root)
        return "profiler", importlib.import_module("profiler.cli")
    return "natten.profiler", importlib.import_module("natten.profiler.cli")


MODULE, cli = _profiler_module()

TINY = ["-i", "9", "8", "-b", "2", "-n", "2", "-d", "8", "-k", "3", "--warmup", "1", "--repeat", "2", "--device", "cpu"]


def run_main(args, capsys):
    out = io.StringIO()
    rc = cli.main(args, out=out)
    captured = capsys.readouterr()
    return rc, out.getvalue(), captured.err


def run_subprocess(args, timeout=300):
    env = dict(os.environ)
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__))) if MODULE == "profiler" else None
    return subprocess.run(
        [sys.executable, "-m", MODULE, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def table_rows(text):
    """(backend, pass, median, min, tflops, host ms) rows of the result table; a failed pass is
    (backend, pass, "error: <reason>")."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    rows = []
    for line in lines[start + 2:]:
        parts = line.split()
        if len(parts) > 2 and parts[2] == "error:":
            rows.append(parts[:2] + [line[line.index("error:"):]])
            continue
        if len(parts) != 6:
            break
        rows.append(parts)
    return rows


# ---- in-process ------------------------------------------------------------------------


def test_forward_table(capsys):
    rc, out, err = run_main(TINY, capsys)
    assert rc == 0, err
    assert "problem: na2d  input 9x8  batch 2  heads 2  dim 8  kernel 3x3" in out
    assert "device: cpu" in out
    rows = table_rows(out)
    assert [r[:2] for r in rows] == [["cpu", "forward"]]
    assert float(rows[0][2]) > 0 and float(rows[0][4]) > 0 and float(rows[0][5]) > 0
    assert "2 flops per multiply-add" in out and "3.5x forward" in out
    assert "cpu forward" in err  # progress goes to stderr


def test_backprop_and_json(tmp_path, capsys):
    path = tmp_path / "sub" / "result.json"
    args = TINY + ["--backprop", "--causal", "1", "0", "--stride", "1", "2", "--extra-kv", "3", "--json", str(path)]
    rc, out, err = run_main(args, capsys)
    assert rc == 0, err
    assert [r[:2] for r in table_rows(out)] == [["cpu", "forward"], ["cpu", "fwd+bwd"]]
    report = json.loads(path.read_text())
    assert report["problem"]["input_size"] == [9, 8]
    assert report["problem"]["is_causal"] == [True, False]
    fwd = fna_flops(2, 2, (9, 8), 8, 3, (1, 2), 1, (True, False), num_extra_kv=3)
    assert report["forward_multiply_adds"] == fwd
    by_pass = {r["pass"]: r for r in report["results"]}
    assert by_pass["forward"]["flops"] == 2 * fwd
    assert by_pass["fwd+bwd"]["flops"] == int(3.5 * 2 * fwd)
    for r in report["results"]:
        assert r["backend"] == "cpu" and r["error"] is None
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0


def test_sweep_tiles_labels_each_configuration(capsys):
    from natten import backends

    Problem = importlib.import_module(f"{MODULE}.problem").Problem
    rc, out, err = run_main(TINY + ["--backprop", "--sweep-tiles"], capsys)
    assert rc == 0, err
    problem = Problem(input_size=(9, 8), batch=2, heads=2, heads_kv=None, dim=8, dim_value=None,
                      kernel_size=(3,), stride=(1,), dilation=(1,), is_causal=(False,), extra_kv=0,
                      dtype="float32", device="cpu", seed=0)
    fused = cli.fused_problem(problem, problem.make_inputs())
    q, kv = backends.get("cpu").tile_configs(fused, False)[0]
    label = f"cpu q{'x'.join(map(str, q))} kv{'x'.join(map(str, kv))}"
    lines = [line for line in out.splitlines() if line.startswith(label)]
    assert [line.split()[3] for line in lines] == ["forward", "fwd+bwd"]


def test_gqa_dims_and_rank3(capsys):
    args = ["-i", "4", "5", "6", "-n", "4", "--heads-kv", "2", "-d", "8", "--dim-value", "16",
            "-k", "3", "2", "3", "--dilation", "1", "2", "1", "--warmup", "0", "--repeat", "1", "--device", "cpu"]
    rc, out, err = run_main(args, capsys)
    assert rc == 0, err
    assert "na3d" in out and "heads 4 (kv 2)" in out and "dim 8 (v 16)" in out
    assert table_rows(out)[0][:2] == ["cpu", "forward"]


def test_dry_run_lists_backends(capsys):
    rc, out, err = run_main(TINY + ["--dry-run"], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("backend"))) + 2
    end = lines.index("", start)  # the bounds follow after a blank line
    listing = {line.split()[0]: line for line in lines[start:end]}
    assert listing["cpu"].split()[1] == "yes"
    assert "speed-of-light bounds" in out and "bound ms needs dense attention's rate" in out
    for name in ("reference", "cutlass-fna", "hopper-fna", "flex-fna"):
        assert listing[name].split()[1] == "no" and "not available on cpu" in listing[name]
    assert "median ms" not in out  # nothing timed


def test_dry_run_explains_rejection(capsys):
    rc, out, err = run_main(["-i", "8", "-k", "3", "--dilation", "3", "--device", "cpu", "--dry-run"], capsys)
    assert rc == 0, err
    cpu_line = next(line for line in out.splitlines() if line.startswith("cpu "))
    assert cpu_line.split()[1] == "no" and len(cpu_line.split()) > 2  # a reason is given


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-i", "8", "8", "-k", "3", "3", "3"], "kernel size"),
        (["-i", "8", "8", "-k", "9"], ""),  # window larger than the input: natten's reason
        (["-i", "8", "8", "-k", "3", "--backend", "no-such-backend"], "no-such-backend"),
        (["-i", "8", "8", "-n", "3", "--heads-kv", "2", "-k", "3", "--backend", "cpu"], ""),
    ],
)
def test_bad_problem_is_a_clean_error(args, needle, capsys):
    rc, out, err = run_main(args + ["--device", "cpu", "--warmup", "0", "--repeat", "1"], capsys)
    assert rc == 2
    assert "natten-profiler: error:" in err and needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [["--causal", "maybe"], ["-k", "0"], ["--dtype", "int8"], ["-i"]])
def test_bad_arguments_argparse(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def _failing(monkeypatch, failing, backends=("cpu", "flex-fna")):
    """Two backends on the CPU (flex-fna runs CPU tensors when named), and `time_pass` raising a
    multi-line compiler-like error for the backends in `failing`."""
    monkeypatch.setattr(cli, "device_backends", lambda device: list(backends))
    real = cli.time_pass

    def time_pass(problem, backend, *args, **kwargs):
        if backend in failing:
            raise RuntimeError(f"{backend} lowering failed:\n  Q and KV block size must be divisible\n\nmore")
        return real(problem, backend, *args, **kwargs)

    monkeypatch.setattr(cli, "time_pass", time_pass)


def test_failing_backend_is_a_row_and_the_others_go_on(monkeypatch, tmp_path, capsys):
    _failing(monkeypatch, {"flex-fna"})
    path = tmp_path / "r.json"
    rc, out, err = run_main(TINY + ["--backprop", "--json", str(path)], capsys)
    assert rc == 0, err
    rows = table_rows(out)
    assert [r[:2] for r in rows] == [["cpu", "forward"], ["cpu", "fwd+bwd"], ["flex-fna", "forward"],
                                     ["flex-fna", "fwd+bwd"]]
    assert float(rows[0][2]) > 0 and float(rows[1][2]) > 0
    expected = "error: RuntimeError: flex-fna lowering failed: Q and KV block size must be divisible more"
    assert rows[2][2] == rows[3][2] == expected
    assert "Traceback" not in err
    report = json.loads(path.read_text())
    assert not report["all_failed"]
    assert [r["error"] is None for r in report["results"]] == [True, True, False, False]


def test_every_backend_failing_exits_non_zero(monkeypatch, tmp_path, capsys):
    _failing(monkeypatch, {"cpu", "flex-fna"})
    path = tmp_path / "r.json"
    rc, out, err = run_main(TINY + ["--json", str(path)], capsys)
    assert rc == 1
    assert [r[:2] for r in table_rows(out)] == [["cpu", "forward"], ["flex-fna", "forward"]]
    assert all(r[2].startswith("error: RuntimeError") for r in table_rows(out))
    assert "every backend failed" in err and "Traceback" not in err
    assert json.loads(path.read_text())["all_failed"]


def test_sweep_tiles_failure_is_a_row(monkeypatch, capsys):
    _failing(monkeypatch, {"flex-fna"})
    rc, out, err = run_main(TINY + ["--sweep-tiles"], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    cpu = [line for line in lines if line.startswith("cpu q")]
    flex = [line for line in lines if line.startswith("flex-fna q")]
    assert len(cpu) == 1 and "error" not in cpu[0]
    assert len(flex) == 1 and "error: RuntimeError: flex-fna lowering failed" in flex[0]


def test_declined_backend_named_explicitly_is_a_row(monkeypatch, capsys):
    # float64 is CPU-only in natten but flex-fna declines it: a row for the named backend, while
    # cpu runs.
    monkeypatch.setattr(cli, "device_backends", lambda device: ["cpu", "flex-fna"])
    rc, out, err = run_main(TINY + ["--dtype", "float64", "--backend", "cpu", "flex-fna"], capsys)
    assert rc == 0, err
    rows = table_rows(out)
    assert rows[0][:2] == ["cpu", "forward"] and float(rows[0][2]) > 0
    assert rows[1][:2] == ["flex-fna", "forward"] and "cannot run this problem" in rows[1][2] and "float64" in rows[1][2]


def test_backend_declining_the_backward_is_a_skipped_line(monkeypatch, capsys):
    # A forward-only family (hopper-fna on a GPU) under --backprop: its forward is a row, its
    # fwd+bwd a "skipped" line with the reason, not an error row; named explicitly, an error row.
    real = cli.check_backend

    def check(problem, backend, passes=("forward",)):
        reasons = real(problem, backend, passes)
        if backend == "flex-fna" and "fwd+bwd" in reasons:
            reasons["fwd+bwd"] = "gradients are not supported by flex-fna here"
        return reasons

    monkeypatch.setattr(cli, "check_backend", check)
    monkeypatch.setattr(cli, "device_backends", lambda device: ["cpu", "flex-fna"])
    rc, out, err = run_main(TINY + ["--backprop"], capsys)
    assert rc == 0, err
    assert [r[:2] for r in table_rows(out)] == [["cpu", "forward"], ["cpu", "fwd+bwd"], ["flex-fna", "forward"]]
    assert all(not r[2].startswith("error:") for r in table_rows(out))
    assert "skipped flex-fna fwd+bwd: gradients are not supported by flex-fna here" in out
    rc, out, err = run_main(TINY + ["--backprop", "--backend", "flex-fna"], capsys)
    rows = table_rows(out)
    assert [r[:2] for r in rows] == [["flex-fna", "forward"], ["flex-fna", "fwd+bwd"]]
    assert not rows[0][2].startswith("error:") and "cannot run this problem: gradients" in rows[1][2]


# ---- subprocess ------------------------------------------------------------------------


def test_subprocess_tiny_json(tmp_path):
    path = tmp_path / "r.json"
    proc = run_subprocess(TINY + ["--backprop", "--json", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert [r[:2] for r in table_rows(proc.stdout)] == [["cpu", "forward"], ["cpu", "fwd+bwd"]]
    report = json.loads(path.read_text())
    assert {r["pass"] for r in report["results"]} == {"forward", "fwd+bwd"}


def test_subprocess_dry_run():
    proc = run_subprocess(TINY + ["--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "usable" in proc.stdout and "cpu" in proc.stdout


def test_subprocess_error_has_no_traceback():
    proc = run_subprocess(["-i", "8", "8", "-k", "9", "--device", "cpu"])
    assert proc.returncode == 2
    assert "natten-profiler: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_subprocess_default_problem_cpu():
    proc = run_subprocess(["--device", "cpu"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "input 32x32  batch 1  heads 4  dim 32  kernel 7x7" in proc.stdout
    assert table_rows(proc.stdout)[0][:2] == ["cpu", "forward"]


def test_backend_names_choose_the_device():
    """`--backend cpu` on a GPU machine runs on the CPU without `--device cpu`; backends of
    different devices (or none named) leave the choice to --device and the default."""
    assert cli.backends_device(["cpu"]) == "cpu"
    assert cli.backends_device(["reference", "flex-fna"]) == "cuda"
    assert cli.backends_device(["cpu", "reference"]) is None
    assert cli.backends_device(["no-such-backend"]) is None
    assert cli.backends_device(None) is None


# ---- speed-of-light bounds -------------------------------------------------------------

bound = importlib.import_module(f"{MODULE}.bound")
Problem = importlib.import_module(f"{MODULE}.problem").Problem

# Hand-worked tile counts (cutlass-fna's walk: key boxes start at the first key of the union of
# a query box's windows). A non-causal axis of extent L and window k (left k//2, right k//2 or
# k//2-1) gives the query at x the keys c-left..c+right, c = clamp(x, left, L-1-right); a query box
# [b, b+tq) touches keys clamp(b)-left .. clamp(b+tq-1)+right, in ceil(span / tk) key boxes.
#
# P2 axis (L 128, k 32: left 16, right 15, centres clamped to [16, 112]):
#   tq 8:  boxes b = 0, 8, 112, 120 span 32 keys; the 12 others span 8 + 31 = 39.
#          tk 8: 4 and 5 key boxes -> 8 * 8 * (4 * 4 + 12 * 5) = 4864 pairs
#   tq 16: boxes b = 0, 112 span 32; the 6 others span 16 + 31 = 47.
#          tk 8: 4 and 6 key boxes -> 16 * 8 * (2 * 4 + 6 * 6) = 5632 pairs
P2_Q8_KV8 = 8 * 8 * (4 * 4 + 12 * 5)
P2_Q16_KV8 = 16 * 8 * (2 * 4 + 6 * 6)
# P3 axes (L 16, k 8: left 4, right 3, centres in [4, 12]; L 64, k 16: left 8, right 7, [8, 56]):
#   L 16, tq 4, tk 4: boxes 0 and 12 span 8 keys (2 boxes), 4 and 8 span 4 + 7 = 11 (3 boxes)
#   L 64, tq 4, tk 4: boxes 0, 4, 56, 60 span 16 (4 boxes), the 12 others 4 + 15 = 19 (5 boxes)
#   L 64, tq 8, tk 4: boxes 0 and 56 span 16 (4 boxes), the 6 others 8 + 15 = 23 (6 boxes)
P3_L16 = 4 * 4 * (2 * 2 + 2 * 3)
P3_L64_Q4 = 4 * 4 * (4 * 4 + 12 * 5)
P3_L64_Q8 = 8 * 4 * (2 * 4 + 6 * 6)
P2 = dict(input_size=(128, 128), batch=1, heads=16, dim=128, kernel_size=(32, 32), dtype="bfloat16")
P3 = dict(input_size=(16, 64, 64), batch=1, heads=16, dim=128, kernel_size=(8, 16, 16), dtype="bfloat16")
# cutlass-fna's default tiles (the walk_cost rule over the GPU build's instantiations): P2 forward
# 8x16 / 8x8 and backward 8x8 / 8x8; P3 forward 4x4x8 / 4x4x4 and backward 4x4x4 / 4x4x4.
P2_TILES = ((8, 16), (8, 8), (8, 8), (8, 8))
P3_TILES = ((4, 4, 8), (4, 4, 4), (4, 4, 4), (4, 4, 4))
# FLOPs per pair: 2 per multiply-add, D + Dv multiply-adds, 16 heads, batch 1
PER_PAIR = 2 * (128 + 128) * 16
P2_FWD = P2_Q8_KV8 * P2_Q16_KV8 * PER_PAIR
P2_BWD = P2_Q8_KV8 * P2_Q8_KV8 * PER_PAIR
P2_USEFUL = (128 * 32) ** 2 * PER_PAIR  # every query sees 32 x 32 keys
P3_FWD = P3_L16 * P3_L64_Q4 * P3_L64_Q8 * PER_PAIR
P3_BWD = P3_L16 * P3_L64_Q4 * P3_L64_Q4 * PER_PAIR
P3_USEFUL = 16 * 8 * (64 * 16) ** 2 * PER_PAIR


@pytest.mark.parametrize("args,layout,expected", [
    ((128, 32, 1, 1, False, 8, 8), "walk", P2_Q8_KV8),
    ((128, 32, 1, 1, False, 16, 8), "walk", P2_Q16_KV8),
    ((16, 8, 1, 1, False, 4, 4), "walk", P3_L16),
    ((64, 16, 1, 1, False, 8, 4), "walk", P3_L64_Q8),
    # aligned key boxes (flex-fna): L 16, k 8, tq 4, tk 4: boxes 0 and 12 see 0..7 and 8..15 (2 key
    # boxes each), box 4 sees 0..10 (3), box 8 sees 4..14 (keys boxes 4-7, 8-11, 12-15: 3)
    ((16, 8, 1, 1, False, 4, 4), "aligned", 4 * 4 * (2 + 3 + 3 + 2)),
    # aligned, L 10, k 3, tq 4, tk 4: box 0 sees 0..4 (boxes 0-3, 4-7), box 4 sees 3..8 (0-3, 4-7, 8-11),
    # box 8 (2 queries, padded to 4) sees 7..9 (4-7, 8-11)
    ((10, 3, 1, 1, False, 4, 4), "aligned", 4 * 4 * (2 + 3 + 2)),
    # causal, L 8, k 3, tq 4, tk 2: box 0 sees 0..3 (2 key boxes), box 4 sees 2..7 (3)
    ((8, 3, 1, 1, True, 4, 2), "walk", 4 * 2 * (2 + 3)),
    # dilation 2, L 9, k 3: groups of 5 (residue 0) and 4 (residue 1), tq 4, tk 4. Group of 5: box
    # [0,4) sees 0..4 (2 key boxes), box [4,5) sees 2..4 (1); group of 4: box [0,4) sees 0..3 (1)
    ((9, 3, 1, 2, False, 4, 4), "walk", 4 * 4 * (2 + 1 + 1)),
    # stride 2, L 8, k 4 (left 2, right 1): stride groups lead at 1, 3, 5, 7 -> centres 2, 3, 5, 6;
    # queries 0..3 see 0..4, queries 4..7 see 3..7; tq 4, tk 4: 2 key boxes each
    ((8, 4, 2, 1, False, 4, 4), "walk", 4 * 4 * (2 + 2)),
])
def test_axis_tile_pairs_hand_cases(args, layout, expected):
    assert bound.axis_tile_pairs(*args, layout) == expected


def test_exact_layout_counts_the_useful_flops():
    problem = Problem(input_size=(9, 8), batch=2, heads=3, heads_kv=1, dim=8, dim_value=16, kernel_size=(3, 4),
                      stride=(1, 2), dilation=(2, 1), is_causal=(True, False), extra_kv=5)
    for backend in ("cpu", "reference"):
        b = bound.bound(problem, backend, "fwd+bwd", (8, 8), (4, 4), (2, 2), (4, 4))
        assert b.tile_flops == b.useful_flops == int(3.5 * 2 * problem.forward_flops())
        assert b.efficiency == 1.0


def test_extra_keys_fill_whole_key_tiles():
    # 1-D, L 16, k 16 (every query sees all 16 keys), tq 8, tk 8 -> 2 query boxes x 2 key boxes;
    # 5 extra keys take one more 8-key box per query box.
    problem = Problem(input_size=(16,), batch=1, heads=1, dim=4, kernel_size=(16,), extra_kv=5)
    b = bound.bound(problem, "cutlass-fna", "forward", (8,), (8,))
    assert b.tile_flops == 2 * (2 * 8 * 2 * 8 + 2 * 8 * 8) * (4 + 4)
    assert b.useful_flops == 2 * (16 * 16 + 16 * 5) * (4 + 4)


@pytest.mark.parametrize("spec,tiles,fwd,bwd,useful", [(P2, P2_TILES, P2_FWD, P2_BWD, P2_USEFUL),
                                                       (P3, P3_TILES, P3_FWD, P3_BWD, P3_USEFUL)])
def test_benchmark_problem_bounds(spec, tiles, fwd, bwd, useful):
    problem = Problem(**spec)
    assert 2 * problem.forward_flops() == useful
    b = bound.bound(problem, "cutlass-fna", "forward", *tiles[:2], dense_tflops=500.0)
    assert (b.tile_flops, b.useful_flops) == (fwd, useful)
    assert b.best_ms == pytest.approx(fwd / 500e12 * 1e3)
    assert b.fraction(2 * b.best_ms) == pytest.approx(0.5)
    b = bound.bound(problem, "cutlass-fna", "fwd+bwd", *tiles, dense_tflops=400.0)
    assert (b.tile_flops, b.useful_flops) == (fwd + int(2.5 * bwd), int(3.5 * useful))
    assert b.best_ms == pytest.approx((fwd + 2.5 * bwd) / 400e12 * 1e3)


def _bounds_rows(out):
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("speed-of-light bounds"))) + 3
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith("bound ms needs"):
            break
        cells = line.split("  ")
        cells = [c.strip() for c in cells if c.strip()]
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def _dry_run_bounds(spec, device, capsys):
    """The bound rows of `--dry-run --backprop` for a benchmark problem (bf16, 16 heads of 128)."""
    args = ["-i", *map(str, spec["input_size"]), "-k", *map(str, spec["kernel_size"]), "-n", "16", "-d", "128",
            "-b", "1", "--dtype", "bfloat16", "--device", device, "--backprop", "--dry-run", "--dense-tflops", "500"]
    rc, out, err = run_main(args, capsys)
    assert rc == 0, err
    return _bounds_rows(out)


@pytest.mark.parametrize("name,spec,tiles,fwd,bwd", [("P2", P2, P2_TILES, P2_FWD, P2_BWD),
                                                      ("P3", P3, P3_TILES, P3_FWD, P3_BWD)])
def test_dry_run_bounds_of_benchmark_problems(name, spec, tiles, fwd, bwd, monkeypatch, capsys):
    """The --dry-run listing for P2 and P3 with cutlass-fna's default tiles (on the CPU the listing
    is given those configurations; on a GPU build test_gpu_dry_run_bounds reads them from the
    backend)."""
    from natten import tuning

    monkeypatch.setattr(tuning, "candidates", lambda fused: {"cutlass-fna": ([tiles[:2]], [tiles[2:]])})
    rows = _dry_run_bounds(spec, "cpu", capsys)
    dims = ["x".join(map(str, t)) for t in tiles]
    forward = rows[(f"cutlass-fna q{dims[0]} kv{dims[1]}", "forward")]
    both = rows[(f"cutlass-fna q{dims[0]} kv{dims[1]} bwd q{dims[2]} kv{dims[3]}", "fwd+bwd")]
    useful = 2 * Problem(**spec).forward_flops()
    assert forward == [f"{fwd / 1e9:.4g}", f"{100 * useful / fwd:.1f}%", "500.0", f"{fwd / 500e12 * 1e3:.3f}"]
    total = fwd + 2.5 * bwd
    assert both == [f"{total / 1e9:.4g}", f"{100 * 3.5 * useful / total:.1f}%", "500.0",
                    f"{total / 500e12 * 1e3:.3f}"]


# ---- --optimize and the tuning cache ----------------------------------------------------


@pytest.fixture
def tune_cache(tmp_path, monkeypatch):
    from natten import _plan, tuning

    path = tmp_path / "tuning.json"
    monkeypatch.setenv("NATTEN_TUNE_CACHE", str(path))
    _plan._PLANS.clear()
    tuning._LOADED.clear()
    yield path
    _plan._PLANS.clear()


@pytest.mark.parametrize("args,needle", [
    (["--optimize", "--dry-run"], "--optimize cannot be combined with --dry-run"),
    (["--optimize", "--sweep-tiles"], "--optimize cannot be combined with --sweep-tiles"),
    (["--optimize", "--backend", "cpu"], "--optimize cannot be combined with --backend"),
    (["--max-seconds", "5"], "--max-seconds needs --optimize"),
    (["--plot", "r.png"], "--plot needs --optimize"),
    (["--optimize", "--plot", "r.svg"], "name a .png file"),
    (["--dense-tflops", "100"], "--dense-tflops needs --optimize or --dry-run"),
])
def test_tuning_option_errors(args, needle, capsys, tune_cache):
    rc, out, err = run_main(TINY + args, capsys)
    assert rc == 2 and needle in err and "Traceback" not in err
    assert not tune_cache.exists()


@pytest.mark.parametrize("args", [["--max-seconds", "0"], ["--max-seconds", "-3"], ["--max-seconds", "x"],
                                  ["--dense-tflops", "nan"], ["--dense-tflops", "inf"]])
def test_tuning_option_values(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + args)
    assert e.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_plot_without_matplotlib(capsys, tune_cache):
    try:
        import matplotlib  # noqa: F401
        pytest.skip("matplotlib is installed")
    except ImportError:
        pass
    rc, out, err = run_main(TINY + ["--optimize", "--plot", "r.png"], capsys)
    assert rc == 2 and "--plot needs matplotlib, which is not installed" in err
    assert not tune_cache.exists()  # refused before anything was timed


def test_emit_filter_needs_entries(capsys, tune_cache):
    rc, out, err = run_main(["--emit-filter"], capsys)
    assert rc == 2 and "has no entries; run --optimize first" in err


def test_optimize_on_cpu_then_backend_none_takes_the_winner(tune_cache, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    rc, out, err = run_main(TINY + ["--optimize", "--backprop", "--dense-tflops", "1", "--emit-filter",
                                    "--json", str(report_path)], capsys)
    assert rc == 0, err
    report = json.loads(report_path.read_text())
    assert [r["pass"] for r in report["ranking"]] == ["forward", "fwd+bwd"]
    assert all(r["ms"] > 0 and r["fraction_of_bound"] > 0 for r in report["ranking"])
    winner = report["winner"]
    assert winner["backend"] == "cpu" and winner["backward_q_tile"] is not None
    assert f"stored in {tune_cache}" in out and "NATTEN_KERNEL_FILTER=reference" in out
    assert "natten-profiler --optimize" in err  # the progress bar
    entries = {e["problem"]["requires_grad"]: e for e in json.loads(tune_cache.read_text())["entries"]}
    assert entries[True]["choice"] == winner
    forward = next(r for r in report["ranking"] if r["pass"] == "forward")  # the fastest forward
    assert entries[False]["choice"]["q_tile"] == forward["tiles"]["q_tile_shape"]
    assert entries[False]["choice"]["backward_q_tile"] is None
    _check_fresh_process_takes_the_cache(tune_cache, report, winner, "cpu", "torch.float32")


def _check_fresh_process_takes_the_cache(tune_cache, report, winner, device, dtype):
    """A fresh process with backend=None logs the cached winner for a call with gradients and the
    fastest forward for one without."""
    describe = importlib.import_module("natten.tuning").Choice.from_dict(winner).describe()
    for grad, expected in ((True, describe), (False, _fastest_forward(report))):
        proc = _backend_none_process(tune_cache, device, dtype, grad=grad)
        assert proc.returncode == 0, proc.stderr
        assert f"{expected} (tuning cache {tune_cache})" in proc.stderr


def _fastest_forward(report):
    """The description of the configuration of the report's fastest forward."""
    top = next(r for r in report["ranking"] if r["pass"] == "forward")
    tuning = importlib.import_module("natten.tuning")
    return tuning.Choice(top["backend"], tuple(top["tiles"]["q_tile_shape"]),
                         tuple(top["tiles"]["kv_tile_shape"])).describe()


def _backend_none_process(cache_path, device, dtype, grad):
    """A fresh process that runs TINY's problem with backend=None (and its debug log)."""
    script = (
        "import torch, natten\n"
        f"x = [torch.randn(2, 9, 8, 2, 8, device='{device}', dtype={dtype}, requires_grad={grad}) for _ in range(3)]\n"
        "out = natten.na2d(*x, 3)\n"
        f"if {grad}:\n    out.sum().backward()\n"
    )
    env = dict(os.environ, NATTEN_TUNE_CACHE=str(cache_path), NATTEN_LOG_LEVEL="debug")
    root = os.path.dirname(os.path.dirname(os.path.abspath(importlib.import_module("natten").__file__)))
    env["PYTHONPATH"] = root
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=root)


# ---- GPU --------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA not available")


@cuda
def test_gpu_optimize_then_backend_none_takes_the_winner(tune_cache, tmp_path, capsys):
    args = ["-i", "9", "8", "-b", "2", "-n", "2", "-d", "8", "-k", "3", "--dtype", "float16", "--device", "cuda",
            "--warmup", "2", "--repeat", "5", "--optimize", "--backprop", "--max-seconds", "120",
            "--json", str(tmp_path / "r.json")]
    rc, out, err = run_main(args, capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert all(r["dense_tflops"] > 0 for r in report["ranking"])  # measured with dense SDPA
    timed = [r for r in report["ranking"] if r["ms"] is not None]
    assert report["winner"]["backend"] in {r["backend"] for r in timed}
    assert all(0 < r["fraction_of_bound"] for r in timed)
    _check_fresh_process_takes_the_cache(tune_cache, report, report["winner"], "cuda", "torch.float16")


@cuda
@pytest.mark.parametrize("name,spec,tiles,fwd,bwd", [("P2", P2, P2_TILES, P2_FWD, P2_BWD),
                                                      ("P3", P3, P3_TILES, P3_FWD, P3_BWD)])
def test_gpu_dry_run_bounds(name, spec, tiles, fwd, bwd, capsys):
    from natten import backends

    if "cutlass-fna" not in backends.names_for_device("cuda"):
        pytest.skip("no cutlass-fna in this build")
    rows = _dry_run_bounds(spec, "cuda", capsys)
    dims = ["x".join(map(str, t)) for t in tiles]
    assert rows[(f"cutlass-fna q{dims[0]} kv{dims[1]}", "forward")][0] == f"{fwd / 1e9:.4g}"
    key = (f"cutlass-fna q{dims[0]} kv{dims[1]} bwd q{dims[2]} kv{dims[3]}", "fwd+bwd")
    assert rows[key][0] == f"{(fwd + 2.5 * bwd) / 1e9:.4g}"


def test_backend_auto_times_backend_none(tune_cache, capsys, monkeypatch):
    seen = []
    real = cli.time_pass
    monkeypatch.setattr(cli, "time_pass", lambda problem, backend, *a, **k: seen.append(backend) or
                        real(problem, backend, *a, **k))
    rc, out, err = run_main(TINY + ["--backend", "auto", "--backprop"], capsys)
    assert rc == 0, err
    assert [r[:2] for r in table_rows(out)] == [["auto", "forward"], ["auto", "fwd+bwd"]]
    assert seen == ["auto", "auto"] and float(table_rows(out)[0][2]) > 0
    Problem = importlib.import_module(f"{MODULE}.problem").Problem
    calls = []
    monkeypatch.setattr(Problem, "op", property(lambda self: lambda **kw: calls.append(kw["backend"])))
    Problem(input_size=(8, 8)).call({}, "auto")
    assert calls == [None]
    rc, out, err = run_main(TINY + ["--backend", "auto", "--sweep-tiles"], capsys)
    assert rc == 2 and "--backend auto cannot be combined with --sweep-tiles" in err


def test_plot_writes_a_png(tune_cache, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ranking.png"
    rc, out, err = run_main(TINY + ["--optimize", "--backprop", "--dense-tflops", "1", "--plot", str(path)], capsys)
    assert rc == 0, err
    assert f"wrote {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
