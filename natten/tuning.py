"""The tuning cache: which backend and tiles run a problem fastest, measured and kept on disk.

`python -m natten.profiler --optimize` (or, at run time, `natten.autotune(True)`) times every
configuration that can run a problem and stores the winner here. A call with `backend=None` and
no tile shapes asks `choose` before the built-in rule (natten.backends.select and the backends'
default tiles), so training code gets the measured winner without naming it.

The cache is one JSON file (`NATTEN_TUNE_CACHE`, else `$XDG_CACHE_HOME/natten/tuning.json`,
else `~/.cache/natten/tuning.json`). An entry holds the environment it was measured in (device
name and capability, torch and natten versions) and the problem exactly as a plan is keyed
(shapes, dtype, window, GQA, extra keys, head dims, whether gradients are needed, and for
float32 whether TF32 is allowed); only an entry whose environment and problem both equal the
call's is used. Writers hold an exclusive lock on a side file and replace the cache atomically,
so ranks of one job can read and write it at once; readers need no lock. A file that cannot be
read, or is of another format, is reported once and treated as empty.

`NATTEN_LOG_LEVEL=debug` logs, per new plan, the backend and tiles chosen and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from natten._checks import FusedProblem

FORMAT = "natten-tuning-1"
DEFAULT_AUTOTUNE_SECONDS = 60.0

log = logging.getLogger("natten")
if os.environ.get("NATTEN_LOG_LEVEL"):
    try:
        log.setLevel(os.environ["NATTEN_LOG_LEVEL"].upper())
    except ValueError:
        warnings.warn(f"NATTEN_LOG_LEVEL={os.environ['NATTEN_LOG_LEVEL']!r} is not a logging level "
                      "(debug, info, warning, error); ignoring it", RuntimeWarning)
    if not log.handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("[natten] %(message)s"))
        log.addHandler(_handler)

Tile = Tuple[int, ...]


@dataclass(frozen=True)
class Choice:
    """What a plan runs with: a backend, its forward tiles and, for problems that need
    gradients, its backward tiles."""

    backend: str
    q_tile: Tile
    kv_tile: Tile
    backward_q_tile: Optional[Tile] = None
    backward_kv_tile: Optional[Tile] = None

    def describe(self) -> str:
        def dims(t):
            return "x".join(map(str, t))

        text = f"{self.backend} q{dims(self.q_tile)} kv{dims(self.kv_tile)}"
        if self.backward_q_tile is not None:
            text += f" backward q{dims(self.backward_q_tile)} kv{dims(self.backward_kv_tile)}"
        return text

    def to_dict(self) -> dict:
        return {"backend": self.backend, "q_tile": list(self.q_tile), "kv_tile": list(self.kv_tile),
                "backward_q_tile": None if self.backward_q_tile is None else list(self.backward_q_tile),
                "backward_kv_tile": None if self.backward_kv_tile is None else list(self.backward_kv_tile)}

    @staticmethod
    def from_dict(d: dict) -> "Choice":
        def tile(name):
            value = d.get(name)
            return None if value is None else tuple(int(v) for v in value)

        if not isinstance(d.get("backend"), str):
            raise ValueError(f"backend {d.get('backend')!r} is not a name")
        return Choice(d["backend"], tile("q_tile"), tile("kv_tile"), tile("backward_q_tile"),
                      tile("backward_kv_tile"))


# ----------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------

_DEVICES: Dict[str, dict] = {}


def environment(device: torch.device) -> dict:
    """What a measurement depends on besides the problem: the device model, torch, natten."""
    import natten

    name = str(device)
    if name not in _DEVICES:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            model, capability = torch.cuda.get_device_name(index), f"{major}.{minor}"
        else:
            model, capability = f"{device.type} ({platform.machine() or 'unknown'})", None
        _DEVICES[name] = {"device": model, "capability": capability}
    return {**_DEVICES[name], "torch": torch.__version__, "natten": natten.__version__}


def problem_key(problem: FusedProblem) -> dict:
    """The problem as a plan is keyed: everything that decides which kernels can run it and
    how fast (not the device index: equal devices share entries through `environment`)."""
    from natten.backends.base import tf32_allowed

    w = problem.window
    key = {
        "spatial": list(problem.spatial), "batch": problem.batch, "heads": problem.heads,
        "heads_kv": problem.heads_kv, "dim": problem.dim, "dim_v": problem.dim_v,
        "extra_kv": problem.num_extra, "dtype": str(problem.dtype).replace("torch.", ""),
        "kernel_size": list(w.kernel_size), "stride": list(w.stride), "dilation": list(w.dilation),
        "is_causal": list(w.is_causal), "requires_grad": problem.requires_grad,
    }
    if problem.dtype == torch.float32:
        key["tf32"] = tf32_allowed()  # backend=None passes TF32 kernels over when torch forbids them
    return key


def _key(env: dict, problem: dict) -> str:
    return json.dumps([env, problem], sort_keys=True)


# ----------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------


def cache_path() -> str:
    explicit = os.environ.get("NATTEN_TUNE_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "natten", "tuning.json")


_REPORTED: set = set()  # (path, what) already warned about in this process
# path -> (stat signature, entries by key); re-read when the file changes.
_LOADED: Dict[str, Tuple[tuple, Dict[str, dict]]] = {}


def _warn_once(path: str, what: str, message: str) -> None:
    if (path, what) not in _REPORTED:
        _REPORTED.add((path, what))
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _parse(path: str) -> Dict[str, dict]:
    """Entries of the file by key; {} (reported once) when it is missing, unreadable, corrupt
    or of another format."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _warn_once(path, "corrupt", f"natten tuning cache {path} cannot be read ({e}); ignoring it")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        _warn_once(path, "format", f"natten tuning cache {path} has format {found!r}, not {FORMAT!r} "
                                   "(written by another natten version?); ignoring it")
        return {}
    entries = {}
    for entry in data["entries"]:
        try:
            entries[_key(entry["environment"], entry["problem"])] = entry
        except (KeyError, TypeError):
            _warn_once(path, "entry", f"natten tuning cache {path} holds a malformed entry; skipping it")
    return entries


def load(path: Optional[str] = None) -> Dict[str, dict]:
    """Entries of the cache file by key, read again only when the file has changed."""
    path = path or cache_path()
    try:
        st = os.stat(path)
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        signature = None
    cached = _LOADED.get(path)
    if cached is not None and cached[0] == signature:
        return cached[1]
    entries = _parse(path) if signature is not None else {}
    _LOADED[path] = (signature, entries)
    return entries


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on `path`.lock for the read-modify-replace of a writer."""
    with open(path + ".lock", "a+") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX
            import portalocker

            portalocker.lock(f, portalocker.LOCK_EX)
            try:
                yield
            finally:
                portalocker.unlock(f)
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def store(problem: FusedProblem, choice: Choice, ms: Optional[float] = None, source: str = "",
          path: Optional[str] = None) -> str:
    """Records `choice` as the configuration of `problem` in this environment (replacing an
    earlier entry) and returns the cache's path. Other writers' entries are kept: the file is
    re-read under the lock and replaced atomically."""
    path = path or cache_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    entry = {"environment": environment(problem.device), "problem": problem_key(problem),
             "choice": choice.to_dict(), "ms": ms, "source": source,
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with _locked(path):
        entries = _parse(path)
        entries[_key(entry["environment"], entry["problem"])] = entry
        fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the cache from the job's other users
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "entries": list(entries.values())}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return path


def lookup(problem: FusedProblem, path: Optional[str] = None) -> Optional[dict]:
    """The cache entry of `problem` in this environment, or None."""
    return load(path).get(_key(environment(problem.device), problem_key(problem)))


# ----------------------------------------------------------------------------------------
# Validity of a configuration in this build
# ----------------------------------------------------------------------------------------


def invalid(problem: FusedProblem, choice: Choice) -> Optional[str]:
    """Why this build cannot run `problem` with `choice`, or None."""
    from natten import backends

    try:
        backend = backends.get(choice.backend)
    except (TypeError, ValueError) as e:
        return str(e)
    reason = backend.unsupported(problem) or backend.passed_over(problem)
    if reason is not None:
        return f"backend {choice.backend!r}: {reason}"
    passes = [(False, choice.q_tile, choice.kv_tile)]
    if problem.requires_grad:
        passes.append((True, choice.backward_q_tile, choice.backward_kv_tile))
    for backward, q, kv in passes:
        what = "backward tiles" if backward else "tiles"
        if q is None or kv is None or len(q) != problem.rank or len(kv) != problem.rank:
            return f"{what} {q}/{kv} do not have one extent per axis ({problem.rank})"
        reason = backend.check_tiles(problem, q, kv, backward)
        if reason is not None:
            return f"{what} {q}/{kv} of {choice.backend!r}: {reason}"
    return None


def builtin_choice(problem: FusedProblem) -> Choice:
    """What the built-in rule picks: natten.backends.select's backend, its default tiles."""
    from natten import backends

    backend = backends.select(problem, None)
    q, kv, _ = backends.resolve_tiles(backend, problem, None, None, False)
    bq = bkv = None
    if problem.requires_grad:
        bq, bkv, _ = backends.resolve_tiles(backend, problem, None, None, True)
    return Choice(backend.name, q, kv, bq, bkv)


# ----------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One timed configuration: `pass_name` "forward" times the forward tiles q_tile/kv_tile,
    "fwd+bwd" a forward and backward with the backend's fastest forward tiles and q_tile/kv_tile
    as backward tiles."""

    backend: str
    pass_name: str
    q_tile: Tile
    kv_tile: Tile
    tiles: dict  # the natten call's tile keywords
    ms: Optional[float] = None  # None: not timed (out of time) or failed (error)
    error: Optional[str] = None
    extra: Optional[dict] = None  # what the timer reports besides the time (e.g. peak memory)


def candidates(problem: FusedProblem) -> Dict[str, Tuple[List[Tuple[Tile, Tile]], List[Tuple[Tile, Tile]]]]:
    """Per backend that backend=None could pick for `problem`, in preference order: its forward
    and (for problems that need gradients) backward tile pairs (Backend.tile_configs), each
    list starting with the backend's default."""
    from natten import backends

    out = {}
    for name in backends.names_for_device(problem.device.type):
        backend = backends.get(name)
        if backend.unsupported(problem) or backend.passed_over(problem):
            continue
        lists = []
        for backward in (False, True):
            if backward and not problem.requires_grad:
                lists.append([])
                continue
            default = tuple(map(tuple, backends.resolve_tiles(backend, problem, None, None, backward)[:2]))
            configs = [tuple(map(tuple, c)) for c in backend.tile_configs(problem, backward)]
            configs = [c for c in configs if backend.check_tiles(problem, *c, backward) is None]
            lists.append([default] + [c for c in configs if c != default])
        out[name] = tuple(lists)
    return out


TimeFn = Callable[[str, str, dict], Tuple[float, Optional[dict]]]


def search(problem: FusedProblem, time_fn: TimeFn, deadline: Optional[float] = None,
           on_trial: Optional[Callable[[Trial, int, int], None]] = None) -> Tuple[List[Trial], Optional[Choice]]:
    """Times every candidate configuration of `problem` and returns the trials and the winner
    (None when nothing could be timed).

    `time_fn(backend, pass_name, tiles)` returns (milliseconds, extra), `tiles` being the
    natten call's tile keywords. Forward tiles are timed forward only; backward tiles with a
    forward and backward that runs the backend's fastest forward tiles. A problem without
    gradients is won on forward time, one with gradients on forward+backward time.
    Backends go in natten's order of preference, each default first, and the built-in
    choice is timed whatever the deadline; after `deadline` (time.monotonic()) the rest are
    recorded untimed."""
    plan = candidates(problem)
    total = sum(len(f) + len(b) for f, b in plan.values())
    trials: List[Trial] = []

    builtin = next(iter(plan), None)

    def run(backend, pass_name, q, kv, tiles) -> Trial:
        trial = Trial(backend, pass_name, q, kv, tiles)
        # The built-in rule's own configuration (the first backend's first of each pass) is
        # timed whatever the deadline: the winner is never worse than it.
        must = backend == builtin and all(t.pass_name != pass_name for t in trials)
        if deadline is not None and time.monotonic() > deadline and not must:
            trial.error = "not timed: out of time"
        else:
            try:
                trial.ms, trial.extra = time_fn(backend, pass_name, tiles)
            except Exception as e:  # noqa: BLE001 - a configuration that fails loses; the others go on
                trial.error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial, len(trials), total)
        return trial

    best: Dict[str, Tuple[float, Choice]] = {}
    for name, (fwd, bwd) in plan.items():
        timed = [t for t in (run(name, "forward", q, kv, {"q_tile_shape": q, "kv_tile_shape": kv})
                             for q, kv in fwd) if t.ms is not None]
        if not timed:
            continue
        top = min(timed, key=lambda t: t.ms)
        if not problem.requires_grad:
            best[name] = (top.ms, Choice(name, top.q_tile, top.kv_tile))
            continue
        for q, kv in bwd:
            t = run(name, "fwd+bwd", q, kv, {"q_tile_shape": top.q_tile, "kv_tile_shape": top.kv_tile,
                                              "backward_q_tile_shape": q, "backward_kv_tile_shape": kv})
            if t.ms is not None and (name not in best or t.ms < best[name][0]):
                best[name] = (t.ms, Choice(name, top.q_tile, top.kv_tile, q, kv))
    if not best:
        return trials, None
    return trials, min(best.values(), key=lambda b: b[0])[1]


def fastest_forward(trials: List[Trial]) -> Optional[Choice]:
    """The configuration of the fastest forward trial (what a call without gradients should run)."""
    timed = [t for t in trials if t.pass_name == "forward" and t.ms is not None]
    if not timed:
        return None
    top = min(timed, key=lambda t: t.ms)
    return Choice(top.backend, top.q_tile, top.kv_tile)


# ----------------------------------------------------------------------------------------
# Run time
# ----------------------------------------------------------------------------------------

def _env_seconds() -> float:
    text = os.environ.get("NATTEN_AUTOTUNE_SECONDS")
    if text is None:
        return DEFAULT_AUTOTUNE_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        warnings.warn(f"NATTEN_AUTOTUNE_SECONDS={text!r} is not a positive number of seconds; using "
                      f"{DEFAULT_AUTOTUNE_SECONDS:g}", RuntimeWarning)
        return DEFAULT_AUTOTUNE_SECONDS
    return seconds


_AUTOTUNE = {"on": os.environ.get("NATTEN_AUTOTUNE", "0") not in ("", "0"), "seconds": _env_seconds()}


def autotune(enabled: bool = True, max_seconds: Optional[float] = None) -> None:
    """Whether natten tunes each problem it meets for the first time (with backend=None and no
    tile shapes) before running it: every configuration is timed, for at most `max_seconds`
    per problem (default NATTEN_AUTOTUNE_SECONDS, else 60), and the winner is stored in the
    tuning cache, where later calls and processes find it. NATTEN_AUTOTUNE=1 turns it on at
    import."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    if max_seconds is not None:
        if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not max_seconds > 0:
            raise ValueError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}")
        _AUTOTUNE["seconds"] = float(max_seconds)
    _AUTOTUNE["on"] = enabled


def _random_inputs(problem: FusedProblem, requires_grad: bool) -> dict:
    def rand(*shape):
        return torch.randn(*shape, device=problem.device, dtype=problem.dtype).requires_grad_(requires_grad)

    b, s, hkv = problem.batch, problem.spatial, problem.heads_kv
    inputs = {"query": rand(b, *s, problem.heads, problem.dim), "key": rand(b, *s, hkv, problem.dim),
              "value": rand(b, *s, hkv, problem.dim_v)}
    if problem.num_extra:
        inputs["additional_keys"] = rand(b, problem.num_extra, hkv, problem.dim)
        inputs["additional_values"] = rand(b, problem.num_extra, hkv, problem.dim_v)
    return inputs


def _timer(problem: FusedProblem, warmup: int = 2, repeat: int = 5) -> TimeFn:
    """A TimeFn that runs natten on random inputs of the problem's shapes: median of `repeat`
    runs after `warmup`, CUDA events on a GPU, wall clock elsewhere."""
    from natten.functional import na1d, na2d, na3d

    op = {1: na1d, 2: na2d, 3: na3d}[problem.rank]
    w = problem.window
    window = dict(kernel_size=w.kernel_size, stride=w.stride, dilation=w.dilation, is_causal=w.is_causal)
    inputs: Dict[str, dict] = {}

    def time_fn(backend: str, pass_name: str, tiles: dict):
        if pass_name not in inputs:
            inputs[pass_name] = _random_inputs(problem, pass_name == "fwd+bwd")
        x = inputs[pass_name]

        def once():
            if pass_name == "forward":
                with torch.no_grad():
                    op(**x, **window, backend=backend, **tiles)
            else:  # planning may happen under no_grad (e.g. a first call in evaluation code)
                with torch.enable_grad():
                    out = op(**x, **window, backend=backend, **tiles)
                    torch.autograd.grad(out, list(x.values()), torch.ones_like(out))

        for _ in range(warmup):
            once()
        times = []
        for _ in range(repeat):
            if problem.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                once()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                once()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), None

    return time_fn


def _tune(problem: FusedProblem) -> Optional[Choice]:
    seconds = _AUTOTUNE["seconds"]
    on_device = torch.cuda.device(problem.device) if problem.device.type == "cuda" else contextlib.nullcontext()
    with on_device:  # CUDA events time the current device's stream
        trials, winner = search(problem, _timer(problem), time.monotonic() + seconds)
    if winner is None:
        return None
    ms = min(t.ms for t in trials if t.ms is not None and t.backend == winner.backend
             and t.pass_name == ("fwd+bwd" if problem.requires_grad else "forward"))
    try:
        store(problem, winner, ms, "autotune")
    except OSError as e:
        _warn_once(cache_path(), "write", f"natten tuning cache {cache_path()} cannot be written ({e}); "
                                          "tuned configurations last for this process only")
    timed = sum(t.ms is not None for t in trials)
    log.debug("autotuned %d of %d configurations in under %.0f s", timed, len(trials), seconds)
    return winner


# Problems autotuned in this process (by key), so a cache that cannot be written does not
# make every new plan of the same problem tune again.
_TUNED: Dict[str, Optional[Choice]] = {}


def choose(problem: FusedProblem, eager: bool, backend, q_tile, kv_tile, backward_q_tile,
           backward_kv_tile) -> tuple:
    """The backend and tile arguments a plan is built from: those given, unless none is given
    and the tuning cache (or, with autotune on, a new measurement) has a configuration for the
    problem. Traced calls (torch.compile) keep the built-in rule: a trace cannot read files, and
    with dynamic shapes its sizes name no one entry."""
    given = (backend, q_tile, kv_tile, backward_q_tile, backward_kv_tile)
    # Tuning entries are keyed on whole-grid problems; a call that computes only a range of the
    # queries (natten.distributed) keeps the built-in rule.
    if not eager or any(a is not None for a in given) or problem.window.query_range is not None:
        return given
    why = "built-in rule"
    choice = None
    entry = lookup(problem)
    if entry is not None:
        try:
            choice = Choice.from_dict(entry["choice"])
            reason = invalid(problem, choice)
        except (KeyError, TypeError, ValueError) as e:
            reason = f"malformed entry ({e})"
        if reason is None:
            why = f"tuning cache {cache_path()}"
        else:
            _warn_once(cache_path(), _key(entry["environment"], entry["problem"]),
                       f"natten tuning cache entry for this problem is not usable in this build ({reason}); "
                       "using the built-in rule")
            choice = None
    elif _AUTOTUNE["on"] and not (problem.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        key = _key(environment(problem.device), problem_key(problem))
        if key not in _TUNED:
            _TUNED[key] = _tune(problem)
        choice = _TUNED[key]
        if choice is not None:
            why = f"autotuned, at most {_AUTOTUNE['seconds']:g} s"
    if log.isEnabledFor(logging.DEBUG):
        shown = choice or builtin_choice(problem)
        log.debug("plan for %s: %s (%s)", describe(problem), shown.describe(), why)
    if choice is None:
        return given
    return choice.backend, choice.q_tile, choice.kv_tile, choice.backward_q_tile, choice.backward_kv_tile


def describe(problem: FusedProblem) -> str:
    w = problem.window

    def dims(t):
        return "x".join(str(int(v)) for v in t)

    text = (f"na{problem.rank}d {dims(problem.spatial)} batch {problem.batch} heads {problem.heads}"
            f"/{problem.heads_kv} dim {problem.dim}/{problem.dim_v} kernel {dims(w.kernel_size)} "
            f"stride {dims(w.stride)} dilation {dims(w.dilation)} causal {dims(w.is_causal)}")
    if problem.num_extra:
        text += f" extra kv {problem.num_extra}"
    grad = " with grad" if problem.requires_grad else ""
    return f"{text} {str(problem.dtype).replace('torch.', '')}{grad}"


def kernel_filter(entries: Dict[str, dict]) -> str:
    """The NATTEN_KERNEL_FILTER value that builds the compiled kernels the entries use (per
    family, dtype, head dim and rank) and every reference kernel (the fallback of any problem
    on a GPU, and the unfused ops'). Backends without compiled kernels add nothing."""
    from natten.backends import TiledBackend

    dtype_codes = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
    families = {c.name: c.family for c in TiledBackend.__subclasses__() if c.family}
    patterns = set()
    for entry in entries.values():
        family = families.get(entry["choice"]["backend"])
        if family is None:
            continue
        p = entry["problem"]
        head_dim = _padded_head_dim(family, len(p["spatial"]), p["dtype"], max(p["dim"], p["dim_v"]))
        patterns.add(f"{family}:{dtype_codes[p['dtype']]}:{head_dim}:{len(p['spatial'])}")
    return ",".join(sorted(patterns) + ["reference"])


def _padded_head_dim(family: str, rank: int, dtype: str, need: int) -> str:
    """The instantiated head dim a problem of head dim `need` runs at (the smallest that holds
    it), or * when this build lacks the family's kernels."""
    from natten.backends.base import manifest_rows

    dims = sorted({row[4] for row in manifest_rows() or () if row[0] == family and row[2] == rank
                   and row[3] == dtype and row[4] is not None and row[4] >= need})
    return str(dims[0]) if dims else "*"
