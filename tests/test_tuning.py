"""The tuning cache (natten.tuning): file format, keys, locking, lookup by backend=None, the
one-time reports of unusable files and entries, the search, and autotuning. CPU only: the
cpu backend accepts any positive tile shape, so a stored choice is visible in the plan."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

pytest.importorskip("natten._C")

import torch  # noqa: E402

import natten  # noqa: E402
from natten import _plan, tuning  # noqa: E402
from natten._checks import check_fused  # noqa: E402
from conftest import assert_close, randn, tolerance  # noqa: E402
from oracle import reference_na  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private cache file, and a process state with no plan, load or report from before."""
    path = tmp_path / "natten" / "tuning.json"
    monkeypatch.setenv("NATTEN_TUNE_CACHE", str(path))
    for table in (_plan._PLANS, tuning._LOADED, tuning._TUNED):
        table.clear()
    tuning._REPORTED.clear()
    yield path
    _plan._PLANS.clear()
    tuning.autotune(False)


def inputs(shape=(9, 8), heads=2, dim=8, grad=False):
    q = randn(1, *shape, heads, dim, requires_grad=grad)
    k = randn(1, *shape, heads, dim, requires_grad=grad)
    v = randn(1, *shape, heads, dim, requires_grad=grad)
    return q, k, v


def problem_of(q, k, v, kernel=3):
    return check_fused(q.dim() - 3, q, k, v, kernel, 1, 1, False, None, None, None)[0]


def plan_of(q, k, v, kernel=3):
    return _plan.plan(True, q.dim() - 3, q, k, v, None, None, kernel, 1, 1, False, None, None,
                      None, None, None, None)


def check_output(q, k, v, kernel=3):
    out = natten.na2d(q, k, v, kernel)
    ref, _ = reference_na(q.double(), k.double(), v.double(), kernel)
    assert_close(out, ref, tolerance(torch.float32))


# ---- the file ----------------------------------------------------------------------------


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.delenv("NATTEN_TUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_path() == str(tmp_path / "xdg" / "natten" / "tuning.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_path() == str(tmp_path / "home" / ".cache" / "natten" / "tuning.json")


def test_store_and_lookup(cache):
    q, k, v = inputs()
    problem = problem_of(q, k, v)
    assert tuning.lookup(problem) is None
    choice = tuning.Choice("cpu", (2, 4), (4, 4))
    assert tuning.store(problem, choice, 1.5, "test") == str(cache)
    entry = tuning.lookup(problem)
    assert tuning.Choice.from_dict(entry["choice"]) == choice and entry["ms"] == 1.5
    data = json.loads(cache.read_text())
    assert data["format"] == tuning.FORMAT and len(data["entries"]) == 1
    stored = data["entries"][0]
    assert stored["environment"]["torch"] == torch.__version__
    assert stored["environment"]["natten"] == natten.__version__
    assert stored["problem"] == {"spatial": [9, 8], "batch": 1, "heads": 2, "heads_kv": 2, "dim": 8, "dim_v": 8,
                                 "extra_kv": 0, "dtype": "float32", "kernel_size": [3, 3], "stride": [1, 1],
                                 "dilation": [1, 1], "is_causal": [False, False], "requires_grad": False,
                                 "tf32": stored["problem"]["tf32"]}
    # a second store of the same problem replaces its entry; another problem adds one
    tuning.store(problem, tuning.Choice("cpu", (1, 8), (2, 2)), 1.0)
    tuning.store(problem_of(*inputs(shape=(10, 8))), choice)
    assert len(json.loads(cache.read_text())["entries"]) == 2
    assert tuning.lookup(problem)["choice"]["q_tile"] == [1, 8]


@pytest.mark.parametrize("change", ["natten", "torch", "device", "shape", "grad", "heads_kv", "dtype",
                                    "window", "extra"])
def test_key_mismatch(change):
    q, k, v = inputs(heads=4)
    tuning.store(problem_of(q, k, v), tuning.Choice("cpu", (2, 4), (4, 4)))
    with pytest.MonkeyPatch.context() as mp:
        if change == "natten":
            mp.setattr(natten, "__version__", "0.0.0-other")
        elif change == "torch":
            mp.setattr(torch, "__version__", "0.0-other")
        elif change == "device":
            mp.setitem(tuning._DEVICES, "cpu", {"device": "another cpu", "capability": None})
        q2, k2, v2 = q, k, v
        if change == "shape":
            q2, k2, v2 = inputs(shape=(9, 9), heads=4)
        elif change == "grad":
            q2 = q.clone().requires_grad_(True)
        elif change == "heads_kv":
            k2, v2 = k[..., :2, :].contiguous(), v[..., :2, :].contiguous()
        elif change == "dtype":
            q2, k2, v2 = q.double(), k.double(), v.double()
        problem = problem_of(q2, k2, v2, kernel=(3, 5) if change == "window" else 3)
        if change == "extra":
            extra = randn(1, 2, 4, 8)
            problem = check_fused(2, q, k, v, 3, 1, 1, False, None, extra, extra)[0]
        assert tuning.lookup(problem) is None
    assert tuning.lookup(problem_of(q, k, v)) is not None


@pytest.mark.parametrize("content", ["{not json", '{"format": "natten-tuning-0", "entries": []}', "[1, 2]"])
def test_unusable_file_reported_once_and_ignored(cache, content):
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    q, k, v = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuning.lookup(problem_of(q, k, v)) is None
        cache.write_text(content + " ")  # a changed file is read again, not reported again
        check_output(q, k, v)
    reports = [str(w.message) for w in caught if "tuning cache" in str(w.message)]
    assert len(reports) == 1 and str(cache) in reports[0] and "ignoring it" in reports[0]
    # a writer replaces the unusable file with a good one
    tuning.store(problem_of(q, k, v), tuning.Choice("cpu", (2, 4), (4, 4)))
    assert json.loads(cache.read_text())["format"] == tuning.FORMAT
    assert tuning.lookup(problem_of(q, k, v)) is not None


# ---- backend=None ------------------------------------------------------------------------


def test_backend_none_takes_the_cached_choice(caplog):
    q, k, v = inputs()
    builtin = plan_of(q, k, v).tiles
    _plan._PLANS.clear()
    assert builtin[:4] != [2, 4, 4, 4]
    tuning.store(problem_of(q, k, v), tuning.Choice("cpu", (2, 4), (4, 4)), 0.5)
    with caplog.at_level(logging.DEBUG, logger="natten"):
        plan = plan_of(q, k, v)
    assert plan.backend.name == "cpu" and plan.tiles[:4] == [2, 4, 4, 4]
    assert "cpu q2x4 kv4x4 (tuning cache" in caplog.text
    check_output(q, k, v)


def test_backend_none_with_grad_takes_the_backward_tiles():
    q, k, v = inputs(grad=True)
    tuning.store(problem_of(q, k, v), tuning.Choice("cpu", (2, 4), (4, 4), (4, 2), (2, 2)))
    assert plan_of(q, k, v).tiles == [2, 4, 4, 4, 4, 2, 2, 2]
    out = natten.na2d(q, k, v, 3)
    grad = randn(*out.shape)
    out.backward(grad)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, _ = reference_na(qd, kd, vd, 3)
    ref.backward(grad.double())
    for name, t, r in (("q", q, qd), ("k", k, kd), ("v", v, vd)):
        assert_close(t.grad, r.grad, tolerance(torch.float32), f"d{name}")


def test_explicit_arguments_skip_the_cache():
    q, k, v = inputs()
    tuning.store(problem_of(q, k, v), tuning.Choice("cpu", (2, 4), (4, 4)))
    plan = _plan.plan(True, 2, q, k, v, None, None, 3, 1, 1, False, None, None, (3, 3), None, None, None)
    assert plan.tiles[:2] == [3, 3] and plan.tiles[2:4] != [4, 4]


@pytest.mark.parametrize("choice,needle", [
    (tuning.Choice("hopper-fna", (2, 4), (4, 4)), "hopper-fna"),
    (tuning.Choice("no-such", (2, 4), (4, 4)), "unknown"),
    (tuning.Choice("cpu", (2, 4, 1), (4, 4)), "one extent per axis"),
])
def test_unusable_entry_warns_once_and_falls_back(choice, needle, caplog):
    q, k, v = inputs()
    builtin = plan_of(q, k, v).tiles
    _plan._PLANS.clear()
    tuning.store(problem_of(q, k, v), choice)
    with pytest.warns(RuntimeWarning, match=f"not usable in this build.*{needle}"):
        assert plan_of(q, k, v).tiles == builtin
    _plan._PLANS.clear()
    with caplog.at_level(logging.DEBUG, logger="natten"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second plan of the problem does not warn again
            assert plan_of(q, k, v).tiles == builtin
    assert "(built-in rule)" in caplog.text
    check_output(q, k, v)


def test_malformed_entry_falls_back():
    q, k, v = inputs()
    problem = problem_of(q, k, v)
    tuning.store(problem, tuning.Choice("cpu", (2, 4), (4, 4)))
    path = tuning.cache_path()
    data = json.loads(open(path).read())
    data["entries"][0]["choice"] = {"backend": 3}
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.warns(RuntimeWarning, match="malformed entry"):
        plan = plan_of(q, k, v)
    assert plan.backend.name == "cpu"


# ---- search and autotune -----------------------------------------------------------------


def fake_candidates(monkeypatch, configs):
    monkeypatch.setattr(tuning, "candidates", lambda problem: configs)


def test_search_picks_the_fastest_and_survives_failures(monkeypatch):
    fwd = [((8, 8), (4, 4)), ((2, 4), (4, 4)), ((4, 4), (2, 2))]
    bwd = [((8, 8), (4, 4)), ((1, 8), (8, 1))]
    fake_candidates(monkeypatch, {"cpu": (fwd, bwd), "flex-fna": (fwd[:1], bwd[:1])})
    times = {("cpu", "forward", (2, 4)): 1.0, ("cpu", "forward", (8, 8)): 2.0,
             ("cpu", "fwd+bwd", (8, 8)): 5.0, ("cpu", "fwd+bwd", (1, 8)): 4.0,
             ("flex-fna", "forward", (8, 8)): 1.5, ("flex-fna", "fwd+bwd", (8, 8)): 4.5}
    seen = []

    def time_fn(backend, pass_name, tiles):
        key = "backward_q_tile_shape" if pass_name == "fwd+bwd" else "q_tile_shape"
        seen.append((backend, pass_name, tiles))
        if (backend, pass_name, tiles[key]) not in times:
            raise RuntimeError("no kernel")
        return times[(backend, pass_name, tiles[key])], None

    q, k, v = inputs(grad=True)
    trials, winner = tuning.search(problem_of(q, k, v), time_fn)
    assert winner == tuning.Choice("cpu", (2, 4), (4, 4), (1, 8), (8, 1))
    assert len(trials) == 7 and sum(t.error is not None for t in trials) == 1
    assert "RuntimeError: no kernel" in next(t.error for t in trials if t.error)
    # backward tiles are timed with the backend's fastest forward tiles
    assert all(t["q_tile_shape"] == (2, 4) for b, p, t in seen if b == "cpu" and p == "fwd+bwd")
    # without gradients the forward decides
    trials, winner = tuning.search(problem_of(*inputs()), time_fn)
    assert winner == tuning.Choice("cpu", (2, 4), (4, 4)) and len(trials) == 4


def test_search_deadline_still_times_the_builtin_choice(monkeypatch):
    fwd = [((8, 8), (4, 4)), ((2, 4), (4, 4))]
    fake_candidates(monkeypatch, {"cpu": (fwd, fwd), "flex-fna": (fwd, fwd)})
    q, k, v = inputs(grad=True)
    trials, winner = tuning.search(problem_of(q, k, v), lambda b, p, t: (1.0, None), deadline=0.0)
    timed = [(t.backend, t.pass_name, t.q_tile) for t in trials if t.ms is not None]
    assert timed == [("cpu", "forward", (8, 8)), ("cpu", "fwd+bwd", (8, 8))]
    assert all(t.error == "not timed: out of time" for t in trials if t.ms is None)
    assert winner == tuning.Choice("cpu", (8, 8), (4, 4), (8, 8), (4, 4))


def test_autotune_tunes_a_new_problem_once_and_caches_it(cache, monkeypatch, caplog):
    calls = []
    real = tuning._tune
    monkeypatch.setattr(tuning, "_tune", lambda problem: calls.append(problem) or real(problem))
    natten.autotune(True, max_seconds=10)
    q, k, v = inputs(shape=(7, 9), grad=True)
    with caplog.at_level(logging.DEBUG, logger="natten"):
        out = natten.na2d(q, k, v, 3)
    assert "autotuned" in caplog.text and len(calls) == 1
    entry = tuning.lookup(problem_of(q, k, v))
    assert entry["source"] == "autotune" and entry["ms"] > 0 and entry["choice"]["backend"] == "cpu"
    ref, _ = reference_na(q.double(), k.double(), v.double(), 3)
    assert_close(out, ref, tolerance(torch.float32))
    # a new plan of the same problem (another process would too) reads the cache
    _plan._PLANS.clear()
    natten.na2d(q, k, v, 3)
    assert len(calls) == 1


def test_autotune_arguments():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        natten.autotune(1)
    for bad in (0, -1.0, "10", True):
        with pytest.raises(ValueError, match="max_seconds must be a positive number"):
            natten.autotune(True, bad)


def test_autotune_from_the_environment(tmp_path):
    script = textwrap.dedent("""
        import torch, natten
        q = torch.randn(1, 8, 8, 2, 8)
        natten.na2d(q, q, q, 3)
    """)
    env = dict(os.environ, NATTEN_AUTOTUNE="1", NATTEN_AUTOTUNE_SECONDS="5", NATTEN_LOG_LEVEL="debug",
               NATTEN_TUNE_CACHE=str(tmp_path / "c.json"), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "autotuned, at most 5 s" in proc.stderr
    assert json.loads((tmp_path / "c.json").read_text())["entries"][0]["source"] == "autotune"


# ---- several processes -------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    from natten import tuning
    from natten._checks import check_fused
    rank, count = int(sys.argv[1]), int(sys.argv[2])
    for i in range(count):
        q = torch.randn(1, 8 + rank, 8 + i, 1, 8)
        problem = check_fused(2, q, q, q, 3, 1, 1, False, None, None, None)[0]
        tuning.store(problem, tuning.Choice("cpu", (rank + 1, i + 1), (4, 4)), float(i), f"writer {rank}")
        tuning.load()  # readers run alongside the writers
""")


def test_concurrent_writers_lose_nothing(cache):
    writers, count = 4, 12
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(r), str(count)], env=env, cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for r in range(writers)]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()
        assert "Warning" not in p.stderr.read()
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == writers * count
    got = {(e["problem"]["spatial"][0] - 8, e["problem"]["spatial"][1] - 8): e["choice"]["q_tile"] for e in entries}
    assert got == {(r, i): [r + 1, i + 1] for r in range(writers) for i in range(count)}
    assert [f for f in os.listdir(cache.parent) if f.endswith(".json")] == ["tuning.json"]  # no temp files left


# ---- slim builds -------------------------------------------------------------------------


def test_kernel_filter(monkeypatch):
    rows = [("sm80", "fna_fwd", 2, "bfloat16", hd, (8, 16), (8, 8)) for hd in (32, 64, 128)]
    rows += [("sm80", "fna_fwd", 3, "float16", 64, (4, 4, 4), (4, 4, 4))]
    monkeypatch.setattr("natten.backends.base.manifest_rows", lambda: tuple(rows))

    def entry(backend, spatial, dtype, dim, dim_v):
        return {"choice": {"backend": backend}, "problem": {"spatial": spatial, "dtype": dtype, "dim": dim,
                                                            "dim_v": dim_v, "requires_grad": False}}

    entries = {"a": entry("cutlass-fna", [32, 32], "bfloat16", 96, 64),  # padded to 128
               "b": entry("cutlass-fna", [8, 8, 8], "float16", 32, 64),
               "c": entry("cutlass-fna", [64, 64], "bfloat16", 64, 64),
               "d": entry("flex-fna", [512], "float32", 24, 24),  # no compiled kernels
               "e": entry("cutlass-fna", [512], "float32", 32, 32)}  # not in this build: any head dim
    assert tuning.kernel_filter(entries) == "sm80:bf16:128:2,sm80:bf16:64:2,sm80:fp16:64:3,sm80:fp32:*:1,reference"


def test_compiled_call_with_a_cache_entry():
    # Traced calls keep the built-in rule (a trace reads no files); the entry must not break them.
    q, k, v = inputs()
    tuning.store(problem_of(q, k, v), tuning.Choice("cpu", (2, 4), (4, 4)))
    torch._dynamo.reset()
    out = torch.compile(lambda q, k, v: natten.na2d(q, k, v, 3), fullgraph=True)(q, k, v)
    ref, _ = reference_na(q.double(), k.double(), v.double(), 3)
    assert_close(out, ref, tolerance(torch.float32))
