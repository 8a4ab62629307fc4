"""``--optimize``: time every configuration natten can run a problem with, rank them against
their speed-of-light bounds, and store the winner in the tuning cache (natten.tuning), where
``backend=None`` finds it. Also the bound listing of ``--dry-run`` and the ranking plot."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import List, Optional

import torch

from .bound import Bound, bound, measure_dense_tflops
from .timing import forward_fn, fwd_bwd_fn, measure


def _dims(tile) -> str:
    return "x".join(map(str, tile))


def label(backend: str, tiles: dict) -> str:
    """A configuration as `backend qAxB kvCxD [bwd qExF kvGxH]`."""
    text = f"{backend} q{_dims(tiles['q_tile_shape'])} kv{_dims(tiles['kv_tile_shape'])}"
    if "backward_q_tile_shape" in tiles:
        text += f" bwd q{_dims(tiles['backward_q_tile_shape'])} kv{_dims(tiles['backward_kv_tile_shape'])}"
    return text


def dense_rates(problem, passes, given: Optional[float]) -> dict:
    """Dense attention's TFLOP/s per pass: `given` (--dense-tflops) for every pass, else measured
    with dense SDPA on a GPU, else unknown (None)."""
    if given is not None or not problem.device.startswith("cuda"):
        return {p: given for p in passes}
    rates = {}
    for p in passes:
        print(f"measuring dense SDPA ({p}) for the bounds ...", file=sys.stderr, flush=True)
        try:
            rates[p] = measure_dense_tflops(problem, p)
        except RuntimeError as e:  # e.g. no SDPA kernel for the dtype, or out of memory: bounds unknown
            print(f"dense SDPA ({p}) failed, bounds unknown: {' '.join(str(e).split())[:200]}", file=sys.stderr)
            rates[p] = None
    return rates


def _pass_bound(problem, trial_backend: str, pass_name: str, tiles: dict, rate) -> Bound:
    return bound(problem, trial_backend, pass_name, tiles["q_tile_shape"], tiles["kv_tile_shape"],
                 tiles.get("backward_q_tile_shape"), tiles.get("backward_kv_tile_shape"), rate)


def _fmt(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: tuple, rows: List[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(row):
        cells = [str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def bounds_listing(problem, fused, passes, rates: dict, out) -> list:
    """--dry-run: per configuration of every backend that can run the problem, its tile FLOPs,
    the share of them that is useful, and its best time at dense attention's rate."""
    from natten import tuning

    listing = []
    for name, (fwd, bwd) in tuning.candidates(fused).items():
        for pass_name in passes:
            for q, kv in (fwd if pass_name == "forward" else bwd):
                tiles = {"q_tile_shape": q, "kv_tile_shape": kv}
                if pass_name != "forward":  # the forward of a fwd+bwd runs the backend's default
                    tiles = {"q_tile_shape": fwd[0][0], "kv_tile_shape": fwd[0][1],
                             "backward_q_tile_shape": q, "backward_kv_tile_shape": kv}
                b = _pass_bound(problem, name, pass_name, tiles, rates[pass_name])
                listing.append({"configuration": label(name, tiles), "pass": pass_name, **b.to_dict()})
    if not listing:
        return listing
    print("", file=out)
    print("speed-of-light bounds (tiles' FLOPs at dense attention's rate):", file=out)
    rows = [(r["configuration"], r["pass"], f"{r['tile_flops'] / 1e9:.4g}", f"{100 * r['efficiency']:.1f}%",
             _fmt(r["dense_tflops"], 1), _fmt(r["best_ms"])) for r in listing]
    print(_table(("configuration", "pass", "tile GFLOP", "useful", "dense TFLOP/s", "bound ms"), rows), file=out)
    if all(r["dense_tflops"] is None for r in listing):
        print("bound ms needs dense attention's rate: measured on a GPU, or give --dense-tflops", file=out)
    return listing


def _time_fn(problem, warmup: int, repeat: int):
    device = torch.device(problem.device)

    def time_fn(backend: str, pass_name: str, tiles: dict):
        factory = forward_fn if pass_name == "forward" else fwd_bwd_fn
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times, _ = measure(factory(problem, backend, tiles), device, warmup, repeat)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return sorted(times)[len(times) // 2], {"peak_bytes": peak}

    return time_fn


def optimize(problem, fused, backprop: bool, warmup: int, repeat: int, max_seconds: float,
             dense_tflops: Optional[float], out) -> dict:
    """Times every configuration (natten.tuning.search), prints the ranking and stores the
    winner. Returns the report's part; raises RuntimeError when nothing could be timed."""
    from tqdm import tqdm

    from natten import tuning

    passes = ("forward", "fwd+bwd") if backprop else ("forward",)
    rates = dense_rates(problem, passes, dense_tflops)
    total = sum(len(f) + len(b) for f, b in tuning.candidates(fused).values())
    bar = tqdm(total=total, desc="natten-profiler --optimize", unit="config", file=sys.stderr, leave=False)

    def on_trial(trial, done, total):
        bar.set_postfix_str(label(trial.backend, trial.tiles), refresh=False)
        bar.update(1)

    start = time.monotonic()
    try:
        trials, winner = tuning.search(fused, _time_fn(problem, warmup, repeat), start + max_seconds, on_trial)
    finally:
        bar.close()
    elapsed = time.monotonic() - start
    ranking = []
    for pass_name in passes:
        for t in sorted((t for t in trials if t.pass_name == pass_name),
                        key=lambda t: (t.ms is None, t.ms or 0.0)):
            b = _pass_bound(problem, t.backend, pass_name, t.tiles, rates[pass_name])
            tflops = b.useful_flops / (t.ms * 1e-3) / 1e12 if t.ms else None
            peak = (t.extra or {}).get("peak_bytes")
            ranking.append({"configuration": label(t.backend, t.tiles), "backend": t.backend, "pass": pass_name,
                            "tiles": {k: list(v) for k, v in t.tiles.items()}, "ms": t.ms, "tflops": tflops,
                            "fraction_of_bound": b.fraction(t.ms), "peak_bytes": peak, "error": t.error,
                            **b.to_dict()})
    rows = []
    for r in ranking:
        if r["ms"] is None:
            rows.append((r["configuration"], r["pass"], r["error"], "", "", "", ""))
            continue
        fraction = r["fraction_of_bound"]
        rows.append((r["configuration"], r["pass"], _fmt(r["ms"]), _fmt(r["tflops"]), _fmt(r["best_ms"]),
                     "-" if fraction is None else f"{100 * fraction:.0f}%",
                     "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"))
    print(_table(("configuration", "pass", "ms", "TFLOP/s", "bound ms", "of bound", "peak MiB"), rows), file=out)
    timed = sum(t.ms is not None for t in trials)
    print(f"timed {timed} of {len(trials)} configurations in {elapsed:.1f} s (--max-seconds {max_seconds:g})",
          file=out)
    if winner is None:
        raise RuntimeError("no configuration could be timed (see the table)")
    win_pass = "fwd+bwd" if backprop else "forward"
    win_ms = min(t.ms for t in trials if t.ms is not None and t.pass_name == win_pass
                 and t.backend == winner.backend)
    path = tuning.store(fused, winner, win_ms, "natten-profiler --optimize")
    print(f"winner: {winner.describe()} ({win_pass} {win_ms:.3f} ms)", file=out)
    if backprop:
        # Calls without gradients (evaluation) are a problem of their own: they get the fastest forward.
        forward = tuning.fastest_forward(trials)
        forward_ms = min(t.ms for t in trials if t.pass_name == "forward" and t.ms is not None)
        tuning.store(dataclasses.replace(fused, requires_grad=False), forward, forward_ms,
                     "natten-profiler --optimize")
        print(f"without gradients: {forward.describe()} (forward {forward_ms:.3f} ms)", file=out)
    print(f"stored in {path}: backend=None now runs it for this problem", file=out)
    return {"ranking": ranking, "winner": winner.to_dict(), "winner_ms": win_ms, "cache": path,
            "dense_tflops": rates, "elapsed_s": elapsed}


def plot(ranking: list, path: str) -> None:
    """The ranking as horizontal bars, one panel per pass (matplotlib must be importable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = list(dict.fromkeys(r["pass"] for r in ranking if r["ms"] is not None))
    heights = [1.2 + 0.4 * sum(r["pass"] == p and r["ms"] is not None for r in ranking) for p in passes]
    fig, axes = plt.subplots(len(passes), 1, squeeze=False, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights})
    for ax, pass_name in zip(axes[:, 0], passes):
        rows = [r for r in ranking if r["pass"] == pass_name and r["ms"] is not None][::-1]
        ax.barh([r["configuration"] for r in rows], [r["ms"] for r in rows], color="tab:blue", label="measured")
        bounds = [r["best_ms"] for r in rows]
        if all(b is not None for b in bounds):
            ax.barh([r["configuration"] for r in rows], bounds, color="tab:orange", height=0.4, label="bound")
        ax.set_xlabel(f"{pass_name} ms")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
