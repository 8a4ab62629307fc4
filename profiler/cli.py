"""Command line of the natten profiler: ``python -m natten.profiler`` / ``natten-profiler``.

Times every backend that can serve one neighborhood attention problem (or the ones named
with ``--backend``) and prints a table of median times and effective TFLOP/s. With
``--dry-run`` it lists which backends could run the problem and why the others cannot, and
each configuration's speed-of-light bound. ``--optimize`` times every configuration and stores
the winner in the tuning cache that ``backend=None`` reads (see profiler/optimize.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional

import torch

from . import optimize
from .problem import AUTO, DTYPES, Problem
from .timing import PASSES, Timing, time_pass

PROG = "natten-profiler"

FLOPS_NOTE = (
    "FLOPs: exact count over visible (query, key) pairs (natten.flops), 2 flops per "
    "multiply-add, softmax not counted; fwd+bwd counts 3.5x forward (backward = 2.5x forward)."
)


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ----------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "t", "yes", "y"):
        return True
    if lowered in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"invalid bool value {text!r} (use 0/1 or true/false)")


def _int_at_least(minimum: int, rule: str):
    """An argparse type: an integer of at least `minimum` (`rule` says so in errors)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value
    return parse


_positive = _int_at_least(1, "must be a positive integer")
_non_negative = _int_at_least(0, "must be >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


DEFAULT_MAX_SECONDS = 150.0


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# Default problem per device type: small enough to finish in seconds.
DEFAULTS = {
    "cpu": dict(input_size=[32, 32], batch=1, heads=4, dim=32, kernel_size=[7], dtype="float32"),
    "cuda": dict(input_size=[64, 64], batch=2, heads=4, dim=64, kernel_size=[7], dtype="float16"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Time natten's neighborhood attention backends on one problem. Per-axis options "
            "take one value (used for every axis) or one value per axis of --input-size. "
            "With no arguments a small default problem runs on the default device."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("problem")
    g.add_argument("-i", "--input-size", type=_positive, nargs="+", metavar="L",
                   help="token grid; its length sets the rank (1, 2 or 3). "
                        "Default: 32 32 on CPU, 64 64 on CUDA")
    g.add_argument("-b", "--batch-size", type=_positive, default=None, help="batch (default 1 CPU / 2 CUDA)")
    g.add_argument("-n", "--heads", type=_positive, default=4, help="query heads")
    g.add_argument("--heads-kv", type=_positive, default=None, help="key/value heads (GQA/MQA); default: --heads")
    g.add_argument("-d", "--dim", type=_positive, default=None, help="query/key head dim (default 32 CPU / 64 CUDA)")
    g.add_argument("--dim-value", type=_positive, default=None, help="value head dim; default: --dim")
    g.add_argument("-k", "--kernel-size", type=_positive, nargs="+", default=[7], metavar="K", help="window size")
    g.add_argument("--stride", type=_positive, nargs="+", default=[1], metavar="S")
    g.add_argument("--dilation", type=_positive, nargs="+", default=[1], metavar="D")
    g.add_argument("--causal", type=_bool, nargs="+", default=[False], metavar="C",
                   help="causal mask per axis, e.g. --causal 1 0")
    g.add_argument("--extra-kv", type=_non_negative, default=0, metavar="N",
                   help="additional key/value tokens every query attends to")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="element type (default float32 CPU / float16 CUDA)")
    r = p.add_argument_group("run")
    r.add_argument("--backend", nargs="+", default=None, metavar="NAME",
                   help=f"backends to time; default: every backend usable on the device. {AUTO!r} times "
                        "backend=None with no tile shapes: what a call without them runs (the tuning "
                        "cache's choice, else the built-in rule)")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default: cuda if available, else cpu")
    r.add_argument("--backprop", action="store_true", help="also time forward+backward")
    r.add_argument("--warmup", type=_non_negative, default=3, help="untimed runs before timing")
    r.add_argument("--repeat", type=_positive, default=10, help="timed runs (the median is reported)")
    r.add_argument("--sweep-tiles", action="store_true",
                   help="time every tile configuration a backend offers for the problem (forward tiles "
                        "for the forward pass, backward tiles for fwd+bwd), not just its default")
    r.add_argument("--dry-run", action="store_true",
                   help="list the backends that can run the problem, and why others cannot, without timing")
    r.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    o = p.add_argument_group("tuning")
    o.add_argument("--optimize", action="store_true",
                   help="time every configuration of every backend natten could pick for the problem "
                        "(forward; forward+backward too with --backprop), rank them and store the winner "
                        "in the tuning cache, which backend=None reads (path: NATTEN_TUNE_CACHE, else "
                        "$XDG_CACHE_HOME/natten/tuning.json, else ~/.cache/natten/tuning.json)")
    o.add_argument("--max-seconds", type=_positive_float, default=None, metavar="S",
                   help=f"--optimize: stop timing new configurations after S seconds (default "
                        f"{DEFAULT_MAX_SECONDS:g}); the built-in choice is always timed")
    o.add_argument("--dense-tflops", type=_positive_float, default=None, metavar="F",
                   help="dense attention's TFLOP/s for the speed-of-light bounds of --dry-run and "
                        "--optimize; default: measured with dense SDPA on a GPU, unknown on the CPU")
    o.add_argument("--emit-filter", action="store_true",
                   help="print the NATTEN_KERNEL_FILTER that builds only the compiled kernels the tuning "
                        "cache uses, plus the reference kernels (after --optimize, or alone)")
    o.add_argument("--plot", metavar="FILE.png", default=None,
                   help="--optimize: draw the ranking as a bar chart (needs matplotlib)")
    r.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def problem_from_args(args: argparse.Namespace, device: str) -> Problem:
    defaults = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    return Problem(
        input_size=tuple(args.input_size or defaults["input_size"]),
        batch=args.batch_size or defaults["batch"],
        heads=args.heads,
        heads_kv=args.heads_kv,
        dim=args.dim or defaults["dim"],
        dim_value=args.dim_value,
        kernel_size=tuple(args.kernel_size),
        stride=tuple(args.stride),
        dilation=tuple(args.dilation),
        is_causal=tuple(args.causal),
        extra_kv=args.extra_kv,
        dtype=args.dtype or defaults["dtype"],
        device=device,
        seed=args.seed,
    )


def backends_device(names: Optional[list]) -> Optional[str]:
    """The device type every backend named with --backend runs on, so that `--backend cpu` on a
    GPU machine needs no `--device cpu`; None when none is named or they differ."""
    from natten.backends import device_type

    types = {device_type(n) for n in names or ()}
    return types.pop() if len(types) == 1 and None not in types else None


def resolve_device(text: Optional[str]) -> str:
    device = text or default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CliError(f"--device {device!r} is not a device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {device}: only cpu and cuda are supported")
    return str(dev)


# ----------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------


def device_backends(device: str) -> list:
    """Backend names usable on the device type, in natten's order of preference."""
    from natten import backends

    return list(backends.names_for_device(torch.device(device).type))


_REASON_CHARS = 400


def _reason(exc: BaseException, with_type: bool = False) -> str:
    """The exception as one line (compiler errors run to pages: the start says what failed)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if with_type and not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS - 3] + "..."


def fused_problem(problem: Problem, inputs: dict):
    """natten's normalised description of the problem (raises natten's argument errors)."""
    from natten import _checks

    fused, _ = _checks.check_fused(
        problem.rank, inputs["query"], inputs["key"], inputs["value"], problem.kernel_size,
        problem.stride, problem.dilation, problem.is_causal, None,
        inputs.get("additional_keys"), inputs.get("additional_values"),
    )
    return fused


def _dims(tile) -> str:
    return "x".join(map(str, tile))


def tile_jobs(problem: Problem, backend: str, pass_name: str) -> list:
    """(label, tiles) of every tile configuration the backend offers for a pass."""
    from natten import backends

    backward = pass_name != "forward"
    fused = fused_problem(problem, problem.make_inputs(requires_grad=backward))
    prefix = "backward_" if backward else ""
    return [(f"{backend} q{_dims(q)} kv{_dims(kv)}", {f"{prefix}q_tile_shape": q, f"{prefix}kv_tile_shape": kv})
            for q, kv in backends.get(backend).tile_configs(fused, backward)]


def check_backend(problem: Problem, backend: str, passes: tuple = ("forward",)) -> dict:
    """Per pass of ``passes``: None when ``backend`` can run ``problem`` (with gradients for a
    pass other than the forward); otherwise natten's reason why not.

    Asks natten's argument checks and the backend's own support test (no kernel runs), on one set
    of inputs for every pass. Where those are not reachable, a single untimed forward call answers
    for every pass instead: natten validates arguments and backend support before any kernel runs.
    """
    inputs = problem.make_inputs(requires_grad=False)
    try:
        from natten import backends

        fused = fused_problem(problem, inputs)
        impl = backends.get(backend)
        return {p: impl.unsupported(dataclasses.replace(fused, requires_grad=p != "forward")) for p in passes}
    except (ValueError, TypeError) as e:
        return dict.fromkeys(passes, _reason(e))
    except (ImportError, AttributeError):
        pass
    reason = None
    try:
        with torch.no_grad():
            problem.call(inputs, backend)
    except (ValueError, TypeError, NotImplementedError) as e:
        reason = _reason(e)
    finally:
        if problem.device.startswith("cuda"):
            torch.cuda.synchronize()
    return dict.fromkeys(passes, reason)


def device_line(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        return f"device: {device} ({name}, SM{major}{minor})  torch {torch.__version__}"
    return f"device: cpu ({torch.get_num_threads()} threads)  torch {torch.__version__}"


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------


def _fmt(x: float, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_rate(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.3f}" if x >= 1 else f"{x:.3g}"


def format_table(rows: list) -> str:
    """The result table; a pass that failed is one row whose cells after the pass read
    ``error: <reason>``."""
    header = ("backend", "pass", "median ms", "min ms", "TFLOP/s", "host ms")
    cells = [(t.backend, t.pass_name, f"error: {t.error}") if t.error else
             (t.backend, t.pass_name, _fmt(t.median_ms, 3), _fmt(t.min_ms, 3), _fmt_rate(t.tflops),
              _fmt(t.host_ms, 3)) for t in rows]
    timed = [header] + [c for c in cells if len(c) == len(header)]
    widths = [max(len(c[i]) for c in [header] + cells) for i in range(2)]
    widths += [max(len(c[i]) for c in timed) for i in range(2, len(header))]

    def line(row):
        text = [c.ljust(w) for c, w in zip(row[:2], widths)]
        text += [row[2]] if len(row) == 3 else [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        return "  ".join(text).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells])


def format_flops(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(n)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------


def dry_run(problem: Problem, requested: Optional[list], out) -> dict:
    from natten.backends import KNOWN_BACKENDS

    available = device_backends(problem.device)
    names = list(requested) if requested else list(dict.fromkeys(list(available) + list(KNOWN_BACKENDS)))
    listing = []
    for name in names:
        if name not in available:
            where = torch.device(problem.device).type
            reason = f"not available on {where} (usable there: {', '.join(available) or 'none'})"
            if name not in KNOWN_BACKENDS:
                reason = f"unknown backend (known: {', '.join(KNOWN_BACKENDS)})"
        else:
            reason = check_backend(problem, name)["forward"]
        listing.append({"backend": name, "usable": reason is None, "reason": reason})
    width = max(len(r["backend"]) for r in listing)
    print(f"{'backend'.ljust(width)}  usable  reason", file=out)
    print(f"{'-' * width}  ------  ------", file=out)
    for r in listing:
        print(f"{r['backend'].ljust(width)}  {'yes' if r['usable'] else 'no':6}  {r['reason'] or ''}".rstrip(), file=out)
    return {"backends": listing}


def run_timings(problem: Problem, requested: Optional[list], passes: tuple, warmup: int, repeat: int, out,
                sweep: bool = False) -> dict:
    available = device_backends(problem.device)
    if requested:
        if sweep and AUTO in requested:
            raise CliError(f"--backend {AUTO} cannot be combined with --sweep-tiles: it times backend=None "
                           "with no tile shapes")
        unknown = [b for b in requested if b not in available and b != AUTO]
        if unknown:
            raise CliError(
                f"--backend {' '.join(unknown)}: not available on {problem.device} "
                f"(usable there: {', '.join(available) or 'none'})"
            )
        names = list(requested)
    else:
        names = available
    if not names:
        raise CliError(f"no natten backend is available on {problem.device}")

    try:
        fused_problem(problem, problem.make_inputs())
    except (ValueError, TypeError) as e:
        raise CliError(f"invalid problem: {_reason(e)}") from None

    rows: list = []
    # Backends natten declines for the problem, or for one pass of it (a forward-only family
    # with --backprop), not asked for by name: a line under the table, not an error row.
    skipped: dict = {}
    jobs = []
    for b in names:
        reasons = dict.fromkeys(passes) if b == AUTO else check_backend(problem, b, passes)
        for p in passes:
            declined = reasons[p]
            if declined is not None and not requested:
                skipped[b if p == "forward" else f"{b} {p}"] = declined
                if p == "forward":
                    break
                continue
            if declined is not None:
                jobs.append((b, p, b, None, f"cannot run this problem: {declined}"))
                continue
            try:
                configs = tile_jobs(problem, b, p) if sweep else [(b, None)]
            except Exception as e:  # noqa: BLE001 - a row of the table, like a failed timing
                jobs.append((b, p, b, None, _reason(e, with_type=True)))
                continue
            jobs += [(b, p, label, tiles, None) for label, tiles in configs]
    if not jobs:
        reasons = "; ".join(f"{b}: {r}" for b, r in skipped.items())
        raise CliError(f"no backend can run this problem: {reasons}")

    for i, (backend, pass_name, label, tiles, error) in enumerate(jobs, 1):
        progress(f"[{i}/{len(jobs)}] {label} {pass_name} ...")
        if error is None:
            try:
                timing = time_pass(problem, backend, pass_name, warmup, repeat, tiles, label)
            except Exception as e:  # noqa: BLE001 - a failing backend is a row; the others go on
                error = _reason(e, with_type=True)
        if error is not None:
            timing = Timing(label, pass_name, error=error)
        rows.append(timing)
        status = f"error: {timing.error}" if timing.error else f"{timing.median_ms:.3f} ms"
        progress(f"[{i}/{len(jobs)}] {label} {pass_name}: {status}")

    print(format_table(rows), file=out)
    for backend, reason in skipped.items():
        print(f"skipped {backend}: {reason}", file=out)
    timer = "CUDA events" if problem.device.startswith("cuda") else "time.perf_counter"
    print(f"Median of {repeat} runs after {warmup} warm-up runs ({timer}).", file=out)
    print(FLOPS_NOTE, file=out)
    return {
        "results": [t.to_dict() for t in rows],
        "skipped": [{"backend": b, "reason": r} for b, r in skipped.items()],
        "all_failed": all(t.error for t in rows),
        "warmup": warmup,
        "repeat": repeat,
        "timer": timer,
        "flops_convention": FLOPS_NOTE,
    }


def check_combination(args: argparse.Namespace) -> None:
    """Options that only make sense together, or not at all together."""
    if args.optimize:
        for flag, given in (("--dry-run", args.dry_run), ("--sweep-tiles", args.sweep_tiles),
                            ("--backend", args.backend is not None)):
            if given:
                raise CliError(f"--optimize cannot be combined with {flag}: it times every configuration "
                               "of every backend natten could pick")
    else:
        for flag, given in (("--max-seconds", args.max_seconds is not None), ("--plot", args.plot is not None)):
            if given:
                raise CliError(f"{flag} needs --optimize")
    if args.dense_tflops is not None and not (args.optimize or args.dry_run):
        raise CliError("--dense-tflops needs --optimize or --dry-run (it sets their bounds)")
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise CliError(f"--plot {args.plot}: the chart is written as PNG; name a .png file")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None


def emit_filter() -> str:
    from natten import tuning

    entries = tuning.load()
    if not entries:
        raise CliError(f"the tuning cache {tuning.cache_path()} has no entries; run --optimize first")
    return tuning.kernel_filter(entries)


def dry_run_bounds(problem: Problem, backprop: bool, dense_tflops: Optional[float], out) -> list:
    try:
        fused = fused_problem(problem, problem.make_inputs(requires_grad=backprop))
    except (ValueError, TypeError):
        return []  # the listing above says why no backend runs it
    passes = PASSES if backprop else PASSES[:1]
    return optimize.bounds_listing(problem, fused, passes, optimize.dense_rates(problem, passes, dense_tflops), out)


def run_optimize(problem: Problem, args: argparse.Namespace, out) -> dict:
    try:
        fused = fused_problem(problem, problem.make_inputs(requires_grad=args.backprop))
    except (ValueError, TypeError) as e:
        raise CliError(f"invalid problem: {_reason(e)}") from None
    from natten import tuning

    if not tuning.candidates(fused):
        last = PASSES[1] if args.backprop else PASSES[0]
        reasons = "; ".join(f"{b}: {check_backend(problem, b, (last,))[last]}"
                            for b in device_backends(problem.device))
        raise CliError(f"no backend can run this problem: {reasons or 'none is available'}")
    max_seconds = args.max_seconds or DEFAULT_MAX_SECONDS
    try:
        return optimize.optimize(problem, fused, args.backprop, args.warmup, args.repeat, max_seconds,
                                 args.dense_tflops, out)
    except RuntimeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return {"all_failed": True}


def main(argv: Optional[list] = None, out=None) -> int:
    """Entry point; returns the exit status: 0 when some backend ran, 1 when every backend that
    was timed failed (each failure is a row of the table), 2 for bad arguments or a problem no
    backend can run."""
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_combination(args)
        if args.emit_filter and not args.optimize:
            print(emit_filter(), file=out)
            return 0
        device = resolve_device(args.device or backends_device(args.backend))
        try:
            problem = problem_from_args(args, device)
        except ValueError as e:
            raise CliError(str(e)) from None
        try:
            fwd_flops = problem.forward_flops()
        except (ValueError, RuntimeError) as e:
            raise CliError(f"invalid problem: {_reason(e)}") from None
        print(f"natten profiler  {device_line(device)}", file=out)
        print(f"problem: {problem.describe()}", file=out)
        print(f"forward: {format_flops(fwd_flops)} multiply-adds", file=out)
        print("", file=out)
        report = {"problem": problem.to_dict(), "device": device_line(device), "forward_multiply_adds": fwd_flops}
        if args.dry_run:
            report.update(dry_run(problem, args.backend, out))
            report["bounds"] = dry_run_bounds(problem, args.backprop, args.dense_tflops, out)
        elif args.optimize:
            report.update(run_optimize(problem, args, out))
        else:
            passes = PASSES if args.backprop else PASSES[:1]
            report.update(run_timings(problem, args.backend, passes, args.warmup, args.repeat, out,
                                      args.sweep_tiles))
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.plot and report.get("ranking"):
        optimize.plot(report["ranking"], args.plot)
        print(f"wrote {args.plot}", file=out)
    if args.emit_filter:
        print(f"NATTEN_KERNEL_FILTER={emit_filter()}", file=out)
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}", file=out)
    if report.get("all_failed"):
        print(f"{PROG}: error: every backend failed on this problem (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
