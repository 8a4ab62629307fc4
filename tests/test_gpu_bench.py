"""The GPU benchmark's backend=None check, run on the CPU with tiny problems."""

import importlib.util
import os

import pytest

pytest.importorskip("natten._C")

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_bench.py")


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dispatch_check_verdicts():
    bench = _bench()
    rows = [dict(problem="P1", pass_="fwd", impl="natten auto", ms=1.0, dispatch=("hopper-fna", 1.05, 1.0)),
            dict(problem="P1", pass_="fwd+bwd", impl="natten auto", ms=1.0, dispatch=("cutlass-fna", 1.2, 1.0)),
            dict(problem="P1", pass_="fwd", impl="natten cutlass-fna", ms=1.7)]
    lines = bench.dispatch_check(rows)
    assert len(lines) == 2
    assert lines[0].startswith("P1 fwd: auto 1.050 ms, fastest named hopper-fna 1.000 ms") and lines[0].endswith("ok")
    assert lines[1].startswith("P1 fwd+bwd:") and lines[1].endswith("SLOW")


def test_auto_is_retimed_against_the_fastest_named_backend():
    import torch

    bench = _bench()
    problem = bench.TINY["P4"]
    rows = bench.run_problem(problem, torch.device("cpu"), torch.float32, [bench.AUTO, "cpu"], ["fwd", "fwd+bwd"],
                             warmup=0, repeat=1, peers=False)
    auto = {r["pass_"]: r for r in rows if r["impl"] == "natten auto"}
    assert set(auto) == {"fwd", "fwd+bwd"}
    for r in auto.values():
        best, auto_ms, best_ms = r["dispatch"]
        assert best == "cpu" and auto_ms > 0 and best_ms > 0
    assert len(bench.dispatch_check(rows)) == 2
