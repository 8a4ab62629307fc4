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
    listing = {line.split()[0]: line for line in out.splitlines()[out.splitlines().index(
        next(line for line in out.splitlines() if line.startswith("backend"))) + 2:] if line.strip()}
    assert listing["cpu"].split()[1] == "yes"
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
