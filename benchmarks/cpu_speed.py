"""CPU speed acceptance: natten's `cpu` backend against dense masked attention.

Two classic neighborhood attention problems (stride 1, dilation 1, non-causal, odd window):

  A  2-D 56x56, batch 8, 4 heads, dim 32, window 7x7, float32
  B  1-D 8192,  batch 1, 4 heads, dim 64, window 255, float32

For each, on the same random inputs in the same run:

* natten (`backend="cpu"`): forward, and forward+backward;
* `torch.nn.functional.scaled_dot_product_attention` with the equivalent dense boolean
  mask [N, N]: forward, and forward+backward;
* `torch.compile(flex_attention)` with the equivalent block mask: forward.

natten's output and gradients are checked against SDPA's (relative error), and flex's
output too, so neither a wrong kernel nor a wrong mask can pass. Times are medians of
`--repeat` runs after warm-up (time.perf_counter; CPU ops are synchronous).

Targets: natten forward and forward+backward at least 5x faster than SDPA; natten forward
faster than compiled flex forward. Exit status 0 when every target passes, 1 otherwise.

    python benchmarks/cpu_speed.py [--repeat N] [--json PATH] [--case A|B ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

try:
    import natten
except ImportError:  # running from a source tree built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import natten

SPEEDUP_VS_SDPA = 5.0
MAX_REL_ERROR = 1e-4  # float32, CPU (docs/semantics.md asks 1e-5 against a float64 oracle)

CASES = {
    "A": dict(shape=(56, 56), batch=8, heads=4, dim=32, kernel=7),
    "B": dict(shape=(8192,), batch=1, heads=4, dim=64, kernel=255),
}


# ----------------------------------------------------------------------------------------
# Masks: classic NA (docs/semantics.md with s = 1, d = 1, non-causal, odd k)
# ----------------------------------------------------------------------------------------


def axis_mask(L: int, k: int) -> torch.Tensor:
    """[L, L] bool: query x sees key y along one axis."""
    x = torch.arange(L)
    start = torch.clamp(x - k // 2, 0, L - k)
    y = torch.arange(L)
    return (y[None, :] >= start[:, None]) & (y[None, :] < start[:, None] + k)


def dense_mask(shape, kernel) -> torch.Tensor:
    """[N, N] bool over row-major flattened tokens: product of the per-axis masks."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    for L, k in zip(shape, kernel):
        a = axis_mask(L, k)
        n = mask.shape[0]
        mask = (mask[:, None, :, None] & a[None, :, None, :]).reshape(n * L, n * L)
    return mask


def flex_mask_mod(shape, kernel):
    """The same mask as a FlexAttention mask_mod on flat indices."""

    def coords(idx):
        out = []
        for L in reversed(shape):
            out.append(idx % L)
            idx = idx // L
        return list(reversed(out))

    def mask_mod(b, h, q_idx, kv_idx):
        keep = None
        for L, k, x, y in zip(shape, kernel, coords(q_idx), coords(kv_idx)):
            start = torch.clamp(x - k // 2, 0, L - k)
            ok = (y >= start) & (y < start + k)
            keep = ok if keep is None else keep & ok
        return keep

    return mask_mod


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


def median_ms(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------


def run_case(name: str, cfg: dict, repeat: int, warmup: int, with_flex: bool) -> dict:
    shape, B, H, D = cfg["shape"], cfg["batch"], cfg["heads"], cfg["dim"]
    rank = len(shape)
    kernel = (cfg["kernel"],) * rank
    N = math.prod(shape)
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank]

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, *shape, H, D, generator=gen) for _ in range(3))
    grad_out = torch.randn(B, *shape, H, D, generator=gen)

    def heads_first(t):  # [B, *S, H, D] -> [B, H, N, D]
        return t.reshape(B, N, H, D).transpose(1, 2).contiguous()

    def heads_last(t):  # [B, H, N, D] -> [B, *S, H, D]
        return t.transpose(1, 2).reshape(B, *shape, H, D)

    qh, kh, vh, goh = (heads_first(t) for t in (q, k, v, grad_out))
    mask = dense_mask(shape, kernel)
    result = {"case": name, **{k_: (list(v_) if isinstance(v_, tuple) else v_) for k_, v_ in cfg.items()}}

    # ---- natten ----
    def natten_fwd():
        with torch.no_grad():
            return na(q, k, v, kernel_size=kernel, backend="cpu")

    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    natten_grads = {}

    def natten_fwd_bwd():
        out = na(qg, kg, vg, kernel_size=kernel, backend="cpu")
        natten_grads["g"] = torch.autograd.grad(out, (qg, kg, vg), grad_out)

    progress(f"[{name}] natten forward")
    result["natten_fwd_ms"] = median_ms(natten_fwd, warmup + 2, max(repeat, 10))
    progress(f"[{name}] natten fwd+bwd")
    result["natten_fwd_bwd_ms"] = median_ms(natten_fwd_bwd, warmup + 2, max(repeat, 10))
    natten_out = natten_fwd()

    # ---- SDPA with the dense mask ----
    def sdpa_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)

    qhg, khg, vhg = (t.clone().requires_grad_(True) for t in (qh, kh, vh))
    sdpa_grads = {}

    def sdpa_fwd_bwd():
        out = F.scaled_dot_product_attention(qhg, khg, vhg, attn_mask=mask)
        sdpa_grads["g"] = torch.autograd.grad(out, (qhg, khg, vhg), goh)

    progress(f"[{name}] sdpa forward")
    result["sdpa_fwd_ms"] = median_ms(sdpa_fwd, warmup, repeat)
    progress(f"[{name}] sdpa fwd+bwd")
    result["sdpa_fwd_bwd_ms"] = median_ms(sdpa_fwd_bwd, warmup, repeat)
    sdpa_out = heads_last(sdpa_fwd())

    result["rel_err_out"] = rel_error(natten_out, sdpa_out)
    result["rel_err_grad"] = max(
        rel_error(g, heads_last(ref)) for g, ref in zip(natten_grads["g"], sdpa_grads["g"])
    )

    # ---- compiled flex attention with the block mask ----
    result["flex_fwd_ms"] = None
    result["flex_error"] = None
    if with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            progress(f"[{name}] flex forward (compiling)")
            block_mask = create_block_mask(flex_mask_mod(shape, kernel), None, None, N, N, device="cpu")
            flex = torch.compile(flex_attention, dynamic=False)

            def flex_fwd():
                with torch.no_grad():
                    return flex(qh, kh, vh, block_mask=block_mask)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                flex_out = heads_last(flex_fwd())  # compiles
                result["flex_fwd_ms"] = median_ms(flex_fwd, warmup, repeat)
            result["rel_err_flex"] = rel_error(flex_out, sdpa_out)
        except Exception as e:  # report, do not hide: the flex target then cannot pass
            result["flex_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return result


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def _ms(x):
    return "n/a" if x is None else f"{x:.2f}"


def _ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.1f}x"


def verdicts(r: dict) -> list:
    """(target, passed, detail) for one case."""
    out = []
    fwd = r["sdpa_fwd_ms"] / r["natten_fwd_ms"]
    bwd = r["sdpa_fwd_bwd_ms"] / r["natten_fwd_bwd_ms"]
    out.append((f"fwd >= {SPEEDUP_VS_SDPA:g}x SDPA", fwd >= SPEEDUP_VS_SDPA, f"{fwd:.1f}x"))
    out.append((f"fwd+bwd >= {SPEEDUP_VS_SDPA:g}x SDPA", bwd >= SPEEDUP_VS_SDPA, f"{bwd:.1f}x"))
    if r["flex_fwd_ms"] is None:
        out.append(("fwd faster than flex", False, f"flex did not run: {r['flex_error']}"))
    else:
        flex = r["flex_fwd_ms"] / r["natten_fwd_ms"]
        out.append(("fwd faster than flex", flex > 1.0, f"{flex:.2f}x"))
    ok_out = r["rel_err_out"] < MAX_REL_ERROR and r["rel_err_grad"] < MAX_REL_ERROR
    out.append((
        f"natten == SDPA (rel err < {MAX_REL_ERROR:g})",
        ok_out,
        f"out {r['rel_err_out']:.1e}, grads {r['rel_err_grad']:.1e}",
    ))
    if r.get("rel_err_flex") is not None:
        ok_flex = r["rel_err_flex"] < MAX_REL_ERROR
        out.append((f"flex == SDPA (rel err < {MAX_REL_ERROR:g})", ok_flex, f"{r['rel_err_flex']:.1e}"))
    return out


def describe(r: dict) -> str:
    shape = "x".join(str(x) for x in r["shape"])
    return f"{r['case']}: {len(r['shape'])}-D {shape}, batch {r['batch']}, heads {r['heads']}, dim {r['dim']}, window {r['kernel']}"


def print_report(results: list) -> bool:
    header = ("case", "pass", "natten ms", "sdpa ms", "flex ms", "sdpa/natten", "flex/natten")
    rows = []
    for r in results:
        rows.append((r["case"], "fwd", _ms(r["natten_fwd_ms"]), _ms(r["sdpa_fwd_ms"]), _ms(r["flex_fwd_ms"]),
                     _ratio(r["sdpa_fwd_ms"], r["natten_fwd_ms"]), _ratio(r["flex_fwd_ms"], r["natten_fwd_ms"])))
        rows.append((r["case"], "fwd+bwd", _ms(r["natten_fwd_bwd_ms"]), _ms(r["sdpa_fwd_bwd_ms"]), "-",
                     _ratio(r["sdpa_fwd_bwd_ms"], r["natten_fwd_bwd_ms"]), "-"))
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median ms")
    for r in results:
        print("  " + describe(r))
    print()
    for n, row in enumerate([header] + rows):
        print("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    all_ok = True
    for r in results:
        for target, ok, detail in verdicts(r):
            all_ok &= ok
            print(f"{'PASS' if ok else 'FAIL'}  {r['case']}  {target:34s} {detail}")
    print(f"\noverall: {'PASS' if all_ok else 'FAIL'}")
    return all_ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--case", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    p.add_argument("--no-flex", action="store_true", help="skip compiled flex attention")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be >= 1 and --warmup >= 0")

    t0 = time.perf_counter()
    results = [run_case(name, CASES[name], args.repeat, args.warmup, not args.no_flex) for name in args.case]
    ok = print_report(results)
    print(f"total time {time.perf_counter() - t0:.0f} s")
    if args.json:
        for r in results:
            r["verdicts"] = [{"target": t, "pass": bool(o), "detail": d} for t, o, d in verdicts(r)]
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "pass": ok,
                       "results": results}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
