"""GPU benchmark: every natten CUDA backend against dense SDPA and row-major flex.

For each problem of benchmarks/problems.py (bfloat16, [B, *S, H, D]) and each pass (forward;
forward+backward unless --no-backprop), times:

* every natten backend usable on the device (natten.backends.names_for_device), through
  natten.na{1,2,3}d(..., backend=name);
* dense torch.nn.functional.scaled_dot_product_attention on the same tokens (no mask,
  heads-first): the cost of ignoring the neighbourhood;
* torch.compile(flex_attention) with the plain row-major NA block mask (no token tiling).

Times: CUDA events around each of back-to-back calls, after warm-up, median over --repeat runs
(a GPU time, unless the host cannot keep up; "host ms" is the host's time per call), and of
replays of a CUDA graph of one call ("graph ms": the GPU's time alone, what small problems' kernels
take when their host cost overlaps other work); peak memory is
torch.cuda.max_memory_allocated after a reset. "GB/s" is a forward's compulsory traffic (Q, K, V
read, O written) over its GPU time (graph replay where there is one), next to a device-to-device
copy of the same bytes timed in the same run (the "device copy" row). Effective TFLOP/s use the exact NA flop count
(natten.flops.fna_flops, 2 flops per multiply-add; forward+backward counted 3.5x forward, the
backward being 2.5x) for every row, SDPA included. Backward passes return the input gradients
(torch.autograd.grad), as a training step with cleared gradients does: no accumulation into
.grad is timed. Correctness guard: each natten backend's
forward output against the row-major flex output (rel err; > 2e-2 is flagged).

    python3 benchmarks/gpu_bench.py [--problems P1,P3] [--backends flex-fna] [--repeat N]
        [--warmup N] [--no-backprop] [--deterministic] [--json PATH]
    python3 benchmarks/gpu_bench.py --device cpu --tiny     # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this source tree before any installed natten
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natten  # noqa: E402
from natten._checks import check_fused  # noqa: E402
from natten.backends import flex as flex_backend  # noqa: E402
from natten.flops import fna_flops  # noqa: E402
try:
    from natten.profiler.timing import measure, measure_graph  # noqa: E402
except ImportError:  # an in-place build (setup.py build_ext --inplace) maps no natten.profiler
    from profiler.timing import measure, measure_graph  # noqa: E402
from problems import PROBLEMS, TINY, Problem  # noqa: E402

GUARD_REL_ERR = 2e-2
BACKWARD_FACTOR = 2.5


def progress(msg: str) -> None:
    print(f"[gpu_bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int):
    """(median ms, peak bytes or None, host ms per call, median ms of CUDA-graph replays or
    None), timed by the profiler's own timers."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, host_ms = measure(fn, device, warmup, repeat)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    graph_ms = None
    if cuda:
        try:
            graph_ms = statistics.median(measure_graph(fn, device, warmup, repeat))
        except Exception as e:  # noqa: BLE001 - some work cannot be captured; say so, go on
            progress(f"CUDA-graph timing unavailable: {' '.join(str(e).split())[:120]}")
    return statistics.median(times), peak, host_ms, graph_ms


def one_line(e: Exception, chars: int = 300) -> str:
    """An exception as one line (compiler errors run to pages: the start says what failed)."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= chars else text[:chars - 3] + "..."


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


# ----------------------------------------------------------------------------------------
# One problem
# ----------------------------------------------------------------------------------------


# `backend=None`: natten's own choice per call, timed like a named backend and checked against
# the fastest named one (dispatch_check).
AUTO = "auto"
AUTO_TOLERANCE = 1.10
RETIME_ROUNDS = 5


def dispatch_check(rows: List[dict]) -> List[str]:
    """Per problem and pass that run_problem re-timed: is `natten auto` within AUTO_TOLERANCE of
    the fastest named natten backend? One line each, "ok" or "SLOW"."""
    lines = []
    for r in rows:
        if "dispatch" in r:
            best, auto_ms, best_ms = r["dispatch"]
            ratio = auto_ms / best_ms
            lines.append(f"{r['problem']} {r['pass_']}: auto {auto_ms:.3f} ms, fastest named {best} {best_ms:.3f} ms "
                         f"(re-timed in alternation, medians of {RETIME_ROUNDS}), ratio {ratio:.3f} "
                         f"{'ok' if ratio <= AUTO_TOLERANCE else 'SLOW'}")
    return lines


def run_problem(p: Problem, device: torch.device, dtype: torch.dtype, backends: List[str],
                passes: List[str], warmup: int, repeat: int, peers: bool = True) -> List[dict]:
    B, S, H, D = p.batch, p.spatial, p.heads, p.dim
    kernel, stride = p.kernel, p.per_axis("stride", 1)
    dilation, causal = p.per_axis("dilation", 1), p.per_axis("causal", False)
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[p.rank]
    flops_fwd = 2 * fna_flops(B, H, S, D, kernel, stride, dilation, causal)

    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, d_out = (torch.randn(B, *S, H, D, generator=gen).to(device=device, dtype=dtype)
                      for _ in range(4))
    scale = D ** -0.5
    rows: List[dict] = []

    # A forward's compulsory traffic: Q, K, V read and O written once.
    fwd_bytes = 4 * q.numel() * q.element_size()

    def record(impl: str, pass_: str, timed, attention: bool = True, **extra):
        ms, peak, host_ms, graph_ms = timed
        flops = flops_fwd * (1 + BACKWARD_FACTOR if pass_ == "fwd+bwd" else 1)
        gpu_ms = ms if graph_ms is None else graph_ms
        rows.append(dict(problem=p.name, impl=impl, pass_=pass_, ms=ms,
                         tflops=flops / (ms * 1e-3) / 1e12 if attention else None,
                         gb_s=fwd_bytes / (gpu_ms * 1e-3) / 1e9 if pass_ == "fwd" else None,
                         peak_mib=None if peak is None else peak / 2**20, host_ms=host_ms,
                         graph_ms=graph_ms, **extra))

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def failed(impl: str, pass_: str, e: Exception):
        msg = one_line(e)
        progress(f"{p.name}: {impl} {pass_} failed: {msg}")
        rows.append(dict(problem=p.name, impl=impl, pass_=pass_, error=msg))

    reference = None
    if peers:
        reference = _peers(p, q, k, v, d_out, scale, device, passes, warmup, repeat, record, leaves, failed)

    # ---- natten backends ----
    calls = {}  # (backend, pass) -> the timed callable, for the re-timing of backend=None below
    for name in backends:
        impl = f"natten {name}"
        kwargs = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal,
                      backend=None if name == AUTO else name)
        guard = {}
        try:
            progress(f"{p.name}: natten {name} forward (first call compiles / builds masks)")
            with torch.no_grad():
                out = na(q, k, v, **kwargs)
            if reference is not None:
                err = rel_err(out, reference)
                guard = dict(rel_err_vs_flex=err, flagged=err > GUARD_REL_ERR)
                if err > GUARD_REL_ERR:
                    progress(f"{p.name}: WARNING natten {name} differs from row-major flex: rel err {err:.2e}")
            if "fwd" in passes:
                def forward(kwargs=kwargs):
                    with torch.no_grad():
                        return na(q, k, v, **kwargs)
                record(impl, "fwd", time_ms(forward, device, warmup, repeat), **guard)
                calls[(name, "fwd")] = forward
        except Exception as e:  # noqa: BLE001 - a failing backend is a row; the others go on
            failed(impl, "fwd", e)
        if "fwd+bwd" in passes:
            try:
                qg, kg, vg = leaves()
                progress(f"{p.name}: natten {name} forward+backward")
                def step(kwargs=kwargs, qg=qg, kg=kg, vg=vg):
                    return torch.autograd.grad(na(qg, kg, vg, **kwargs), (qg, kg, vg), d_out)
                record(impl, "fwd+bwd", time_ms(step, device, warmup, repeat), **guard)
                calls[(name, "fwd+bwd")] = step
            except Exception as e:  # noqa: BLE001
                failed(impl, "fwd+bwd", e)

    # backend=None against the fastest named backend: both re-timed in alternation, so that a
    # clock or host hiccup during one backend's turn does not decide the comparison.
    for pass_ in passes:
        named = [r for r in rows if r["pass_"] == pass_ and "error" not in r and r["impl"].startswith("natten ")
                 and r["impl"] != f"natten {AUTO}"]
        auto_row = next((r for r in rows if r["pass_"] == pass_ and r["impl"] == f"natten {AUTO}"
                         and "error" not in r), None)
        if auto_row is None or not named:
            continue
        best = min(named, key=lambda r: r["ms"])["impl"][len("natten "):]
        rounds = {AUTO: [], best: []}
        progress(f"{p.name}: re-timing auto and {best} ({pass_}) in alternation")
        for _ in range(RETIME_ROUNDS):
            for name, ms in rounds.items():
                ms.append(time_ms(calls[(name, pass_)], device, 1, repeat)[0])
        auto_row["dispatch"] = (best, statistics.median(rounds[AUTO]), statistics.median(rounds[best]))

    # speedup over dense SDPA, per pass
    sdpa = {r["pass_"]: r["ms"] for r in rows if r["impl"] == "sdpa dense"}
    for r in rows:
        if r.get("tflops") is not None and r["pass_"] in sdpa:
            r["speedup_vs_sdpa"] = sdpa[r["pass_"]] / r["ms"]
    return rows


def _row_major_flex(p: Problem, q, k, v, d_out, scale, device, passes, warmup, repeat, record, leaves, failed):
    """Times compiled flex with the plain row-major NA block mask; returns its output (heads-last)."""
    B, S, H, D = p.batch, p.spatial, p.heads, p.dim
    kernel, stride = p.kernel, p.per_axis("stride", 1)
    dilation, causal = p.per_axis("dilation", 1), p.per_axis("causal", False)
    progress(f"{p.name}: flex row-major block mask")
    problem, _ = check_fused(p.rank, q, k, v, kernel, stride, dilation, causal, None, None, None)
    layout = flex_backend.get_layout(problem, None, None)
    qf, kf, vf = flex_backend._prepare(layout, q, k, v, None, None, 0)

    def flex_row_major(qf=qf, kf=kf, vf=vf):
        return flex_backend.compiled_flex(qf, kf, vf, layout.block_mask, scale)

    def to_heads_last(out_f):
        return out_f.transpose(1, 2).index_select(1, layout.q_scatter).reshape(B, *S, H, D)

    progress(f"{p.name}: compiling flex (row-major) forward")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = to_heads_last(flex_row_major())
        stats = dict(blocks=int(layout.block_mask.kv_num_blocks.sum() + layout.block_mask.full_kv_num_blocks.sum()))
        if "fwd" in passes:
            timed = time_ms(flex_row_major, device, warmup, repeat)
            record("flex row-major", "fwd", timed, **stats)
    if "fwd+bwd" in passes:
        if device.type == "cpu":
            progress(f"{p.name}: flex row-major backward skipped (FlexAttention has no CPU backward)")
            return reference
        qg, kg, vg = leaves()
        d_out_f = flex_backend._heads_first(d_out, layout.q_gather)
        real = torch.zeros(layout.num_q, dtype=torch.bool, device=device)
        real[layout.q_scatter] = True
        d_out_f = d_out_f * real[:, None]  # padding rows carry no gradient

        def flex_row_major_bwd():
            a, b, c = flex_backend._prepare(layout, qg, kg, vg, None, None, 0)
            out = flex_backend.compiled_flex(a, b, c, layout.block_mask, scale)
            torch.autograd.grad(out, (qg, kg, vg), d_out_f)

        progress(f"{p.name}: compiling flex (row-major) backward")
        try:
            timed = time_ms(flex_row_major_bwd, device, warmup, repeat)
            record("flex row-major", "fwd+bwd", timed, **stats)
        except Exception as e:  # noqa: BLE001 - the forward reference still stands
            failed("flex row-major", "fwd+bwd", e)
    return reference


def _peers(p: Problem, q, k, v, d_out, scale, device, passes, warmup, repeat, record, leaves, failed):
    """Times row-major flex and dense SDPA; returns the row-major flex output (heads-last), the
    reference the natten backends are checked against (None when it fails). A peer that fails is
    an error row, like a natten backend."""
    B, H, D, N = p.batch, p.heads, p.dim, p.tokens
    # ---- flex, row-major NA block mask (also the correctness reference) ----
    reference = None
    try:
        reference = _row_major_flex(p, q, k, v, d_out, scale, device, passes, warmup, repeat, record, leaves,
                                    failed)
    except Exception as e:  # noqa: BLE001
        failed("flex row-major", "fwd", e)

    # ---- a device-to-device copy of a forward's bytes (2 |Q| read, 2 |Q| written) ----
    if "fwd" in passes and device.type == "cuda":
        src = torch.empty(2 * q.numel(), dtype=q.dtype, device=device).normal_()
        dst = torch.empty_like(src)
        progress(f"{p.name}: device copy of the forward's bytes")
        record("device copy", "fwd", time_ms(lambda: dst.copy_(src), device, warmup, repeat), attention=False)

    # ---- dense SDPA, heads-first, no mask ----
    qh, kh, vh, doh = (t.reshape(B, N, H, D).transpose(1, 2).contiguous() for t in (q, k, v, d_out))
    if "fwd" in passes:
        progress(f"{p.name}: dense SDPA forward")
        try:
            with torch.no_grad():
                timed = time_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh), device, warmup, repeat)
            record("sdpa dense", "fwd", timed)
        except Exception as e:  # noqa: BLE001
            failed("sdpa dense", "fwd", e)
    if "fwd+bwd" in passes:
        progress(f"{p.name}: dense SDPA forward+backward")
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (qh, kh, vh))
        try:
            timed = time_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg),
                                                        doh), device, warmup, repeat)
            record("sdpa dense", "fwd+bwd", timed)
        except Exception as e:  # noqa: BLE001
            failed("sdpa dense", "fwd+bwd", e)
    return reference


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(problems: List[Problem], rows: List[dict], device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ntorch {torch.__version__}, {name}, natten backends: "
          f"{', '.join(sorted({r['impl'] for r in rows if r['impl'].startswith('natten')}))}")
    for p in problems:
        print("  " + p.describe())
    header = ("problem", "impl", "pass", "ms", "host ms", "graph ms", "TFLOP/s", "GB/s", "vs SDPA", "peak MiB",
              "rel err", "note")
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["problem"], r["impl"], r["pass_"], "-", "-", "-", "-", "-", "-", "-", "-",
                          "error: " + r["error"]))
            continue
        note = "FLAGGED > 2e-2" if r.get("flagged") else ""
        table.append((r["problem"], r["impl"], r["pass_"], _fmt(r["ms"], ".3f"), _fmt(r["host_ms"], ".3f"),
                      _fmt(r["graph_ms"], ".3f"),
                      _fmt(r["tflops"], ".3g"), _fmt(r.get("gb_s"), ".0f"),
                      _fmt(r.get("speedup_vs_sdpa"), ".2f") + ("x" if r.get("speedup_vs_sdpa") else ""),
                      _fmt(r["peak_mib"], ".0f"), _fmt(r.get("rel_err_vs_flex"), ".1e"), note))
    widths = [max(len(str(row[i])) for row in [header] + table) for i in range(len(header))]
    print()
    for n, row in enumerate([header] + table):
        print("  ".join(str(c).ljust(w) if i < 3 or i == 11 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--problems", default=",".join(PROBLEMS), help="comma list of P1..P5 (default: all)")
    ap.add_argument("--backends", default=None,
                    help="comma list of natten backends, 'auto' meaning backend=None (default: 'auto' and every "
                         "one usable on the device except the 'reference' fallback, which takes minutes on "
                         "P1-P3, unless it is the only one)")
    ap.add_argument("--repeat", type=int, default=10, help="timed runs, median reported (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--backprop", action=argparse.BooleanOptionalAction, default=True,
                    help="also time forward+backward (default: on; --no-backprop: forward only)")
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: smoke run without a GPU (float32; use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes of the same problem kinds (smoke)")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="time dense SDPA and row-major flex too (and check outputs against the latter)")
    ap.add_argument("--deterministic", action="store_true",
                    help="run under torch.use_deterministic_algorithms(True) (warn_only, so that a peer "
                         "without a deterministic backward still runs): the backwards users of that "
                         "setting get")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        ap.error("--repeat must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available; for a smoke run use --device cpu --tiny")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for it
        torch.use_deterministic_algorithms(True, warn_only=True)
    table = TINY if args.tiny else PROBLEMS
    names = [n.strip() for n in args.problems.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown problems {unknown}; choose from {', '.join(table)}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    available = natten.backends.names_for_device(device.type)
    if device.type == "cpu" and "flex-fna" not in available:
        available.append("flex-fna")  # runs on CPU tensors when asked by name
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = [AUTO] + ([b for b in available if b != "reference"] or available)
    passes = ["fwd"] + (["fwd+bwd"] if args.backprop else [])

    t0 = time.perf_counter()
    problems = [table[n] for n in names]
    rows: List[dict] = []
    for p in problems:
        progress(f"=== {p.describe()} ({time.perf_counter() - t0:.0f} s so far)")
        rows += run_problem(p, device, dtype, backends, passes, args.warmup, args.repeat, args.peers)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress(f"done in {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device),
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                       "dtype": str(dtype), "backends": backends, "tiny": args.tiny,
                       "deterministic": args.deterministic,
                       "problems": [p.__dict__ for p in problems], "results": rows}, f, indent=2)
    print_table(problems, rows, device)
    checks = dispatch_check(rows)
    if checks:
        print(f"\nbackend=None against the fastest named backend (within {AUTO_TOLERANCE - 1:.0%}):")
        print("\n".join("  " + c for c in checks))
    # Exit 1 on a wrong result, or when every natten backend failed everywhere; a backend that
    # fails on some problem is an error row of the table, and the others go on.
    natten_rows = [r for r in rows if r["impl"].startswith("natten ")]
    all_failed = bool(natten_rows) and all("error" in r for r in natten_rows)
    return 1 if all_failed or any(r.get("flagged") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
