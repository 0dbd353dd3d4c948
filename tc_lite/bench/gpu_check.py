"""`python -m tc_lite.bench.gpu_check [--out benchmarks/gpu]` (`bash scripts/gpu_check.sh`): validate the GPU paths.

On a CUDA machine it runs `tc_lite.bench.gpu_checks.GPU_CHECKS` -- `bench memory` with real steps for three
presets, fp16 and bf16 steps, 8-bit AdamW, xformers, both reward offload modes, `bench speed` -- on the full-size
SD1.5 architecture and rewards with random weights (no download), then `bench memory` with real steps of full-size
SDXL base (random weights, bundled configs) on presets/sdxl-12gb.yaml when at least 90 s are left (else it says how
to run it alone; `--only memory/sdxl-aesthetic` adds the 1024² preset in fp16, its VAE in fp32), in ~5-7 minutes
on a current GPU and never more than `--total-budget` (470 s). Each check runs in its own process (a clean CUDA context and peak counter; a crash
or a hang is that check's failure only) within its own time budget; a failure is recorded with its error text
and the next check starts. Without CUDA it says so and runs a CPU subset on the tiny model in a few seconds.

Results go to `<out>/<device>.json` and `<out>/<device>.md` (`nvidia-geforce-rtx-4090.json`, `cpu-only.md`),
rewritten after every check, so an interrupted run keeps what it measured. Exit status 0 when no check failed
or timed out (a check whose subject is not installed counts as done), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from tc_lite.bench.gpu_checks import CHECKS, CPU_CHECKS, GPU_CHECKS, SDXL_EXTRA_CHECKS, Check, Context, Unavailable

SCHEMA = "tc-lite-gpu-check/1"
TOTAL_BUDGET_S = 470.0  # the whole run stays under 8 minutes
CHILD_SLACK_S = 40.0  # a check's process may take this much longer than its budget (imports, CUDA context)
STATUSES = ("ok", "warn", "unavailable", "failed", "timeout", "skipped")
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "xformers")


def sanitize_device_name(name: str | None) -> str:
    """A file name from `torch.cuda.get_device_name()`: "NVIDIA GeForce RTX 4090" -> "nvidia-geforce-rtx-4090"."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(name or "").lower()).strip("-")[:64].strip("-")
    return slug or "unknown-gpu"


class CheckTimeout(BaseException):
    """Raised in a check that ran past its budget (a BaseException: a check's own `except Exception` lets it by)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `CheckTimeout` in the main thread after `seconds` (SIGALRM; elsewhere not enforced in-process)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise CheckTimeout(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _jsonable(obj: Any) -> Any:
    """Strict JSON: non-finite floats become strings ("nan", "inf"), tuples lists, anything else its str()."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _record(check: Check, budget: float) -> dict[str, Any]:
    return {"name": check.name, "title": check.title, "status": "skipped", "budget_s": round(budget, 1),
            "wall_s": 0.0, "summary": "", "result": None, "error": None}


def run_inline(check: Check, ctx: Context, budget: float) -> dict[str, Any]:
    """Run one check in this process within `budget` seconds; every outcome becomes the record's status."""
    rec = _record(check, budget)
    t0 = time.perf_counter()
    try:
        with time_limit(budget):
            result = check.run(ctx)
        rec["result"] = result
        rec["summary"] = str(result.get("summary", ""))
        rec["status"] = "warn" if result.get("warning") else "ok"
        if result.get("warning"):
            rec["summary"] += f" -- {result['warning']}"
    except Unavailable as e:
        rec["status"], rec["summary"] = "unavailable", str(e)
    except CheckTimeout as e:
        rec["status"], rec["error"] = "timeout", str(e)
        rec["summary"] = rec["error"]
    except Exception as e:  # noqa: BLE001 -- a failing check is recorded; the next one runs
        rec["status"] = "failed"
        rec["summary"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        rec["error"] = "".join(traceback.format_exception(e))[-4000:]
    finally:
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        gc.collect()
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return _jsonable(rec)


def run_isolated(check: Check, ctx: Context, budget: float) -> dict[str, Any]:
    """Run one check in a child process (its own CUDA context, peak counter and crash), killed past its budget."""
    rec = _record(check, budget)
    with tempfile.TemporaryDirectory() as tmp:
        result_path, log_path = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, "-m", "tc_lite.bench.gpu_check", "--child", check.name, "--result", str(result_path),
               "--budget", str(budget), *(f"--override={o}" for o in ctx.extra_overrides)]
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=str(Path(__file__).resolve().parents[2]))
            try:
                child.wait(timeout=budget + CHILD_SLACK_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)  # the child's own session: it and nothing else
                child.wait()
        wall = round(time.perf_counter() - t0, 2)
        tail = log_path.read_text(errors="replace")[-3000:]
        if result_path.is_file():
            rec = json.loads(result_path.read_text())
        elif child.returncode == -signal.SIGKILL:
            rec.update(status="timeout", error=f"killed after {wall:.0f} s (budget {budget:.0f} s)\n{tail}",
                       summary=f"killed after {wall:.0f} s (budget {budget:.0f} s)")
        else:
            rec.update(status="failed", error=f"the check's process exited with {child.returncode}\n{tail}",
                       summary=f"process exited with {child.returncode}: {(tail.strip().splitlines() or [''])[-1][:200]}")
        rec["wall_s"] = wall
    return rec


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for pkg in PACKAGES:
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 2),
                   compute_capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    return env


def run_all(checks: Sequence[Check], ctx: Context, *, isolate: bool, total_budget: float, report: dict[str, Any],
            on_update: Callable[[dict[str, Any]], None] = lambda r: None,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `checks` in order into `report["checks"]`; each gets min(its budget, what is left of `total_budget`),
    and is skipped when less than its `min_s` is left."""
    start = time.perf_counter()
    runner = run_isolated if isolate else run_inline
    report["checks"] = []
    for i, check in enumerate(checks, 1):
        room = total_budget - (time.perf_counter() - start) - (CHILD_SLACK_S if isolate else 0)
        budget = min(check.budget_s, room)
        progress(f"[{i:2d}/{len(checks)}] {check.name:<26} ...")
        if room < min(5.0, check.budget_s):
            rec = _record(check, max(budget, 0))
            rec["summary"] = f"skipped: the run's total budget of {total_budget:.0f} s is spent"
        elif room < check.min_s:  # a shortened budget would only end in a timeout
            rec = _record(check, max(budget, 0))
            rec["summary"] = (f"skipped: it needs {check.min_s:.0f} s and {max(room, 0):.0f} s of the run's total "
                              f"budget are left; run it alone: bash scripts/gpu_check.sh --only {check.name}")
        else:
            rec = runner(check, ctx, budget)
        report["checks"].append(rec)
        report["counts"] = {s: sum(r["status"] == s for r in report["checks"]) for s in STATUSES}
        report["wall_s"] = round(time.perf_counter() - start, 1)
        on_update(report)
        progress(f"         {rec['status']}, {rec['wall_s']:.1f} s: {rec['summary']}")
    report["finished_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    on_update(report)
    return report


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def format_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    pkgs = ", ".join(f"{p} {env.get(p)}" for p in PACKAGES)
    lines = [f"# tc-lite GPU check: {report['device']}", "",
             f"{report['note']}", "",
             f"- started {report['started_at']}, {report.get('wall_s', 0):.0f} s in all (budget "
             f"{report['total_budget_s']:.0f} s); python {env['python']}, {pkgs}"]
    if report["cuda"]:
        lines.append(f"- {env['gpu']}: {env['gpu_memory_gib']} GiB, compute capability {env['compute_capability']}, "
                     f"bf16 {'yes' if env['bf16_supported'] else 'no'}, CUDA {env['torch_cuda']}")
        lines.append("- estimate: `tc_lite.memory.estimate_memory` of the preset as written (no GPU); measured: "
                     "`torch.cuda.max_memory_allocated()` over the steps after a warm-up step, SD1.5 and its rewards "
                     "at full size with random weights; times are wall seconds")
    else:
        lines.append("- nothing measured on a GPU; `bench speed` times on the CPU are process CPU time")
    lines += ["",
              "| check | status | result | time / budget (s) |", "|---|---|---|---|"]
    for r in report["checks"]:
        lines.append(f"| {_cell(r['title'])} (`{r['name']}`) | {r['status']} | {_cell(r['summary'])} | "
                     f"{r['wall_s']:.0f} / {r['budget_s']:.0f} |")
    errors = [r for r in report["checks"] if r.get("error")]
    if errors:
        lines += ["", "## Errors"]
        for r in errors:
            lines += ["", f"### {r['name']}", "", "```text", str(r["error"]).strip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / report["device_slug"]
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    for path, text in ((json_path, json.dumps(_jsonable(report), indent=2) + "\n"), (md_path, format_markdown(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return json_path, md_path


def _child(args: argparse.Namespace) -> int:
    import torch

    ctx = Context(extra_overrides=list(args.override), cuda=torch.cuda.is_available())
    rec = run_inline(CHECKS[args.child], ctx, args.budget)
    Path(args.result).write_text(json.dumps(rec))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure nothing tries
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m tc_lite.bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/gpu", help="folder for <device>.json and <device>.md")
    ap.add_argument("--cpu", action="store_true", help="run the CPU subset even where there is a CUDA GPU")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks (see --list)")
    ap.add_argument("--list", action="store_true", help="list the checks and their budgets")
    ap.add_argument("--total-budget", type=float, default=None,
                    help=f"seconds for the whole run (default {TOTAL_BUDGET_S:.0f}; CPU subset 120)")
    ap.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                    help="a process per check (auto: on CUDA, where a clean peak counter matters)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # GPU checks at 64x64, T=3, anywhere
    ap.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--budget-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # slow machines, --smoke
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    if args.list:
        for c in [*GPU_CHECKS, *CPU_CHECKS]:
            print(f"{c.name:<26}{c.budget_s:>5.0f} s  {c.title}")
        for c in SDXL_EXTRA_CHECKS:
            print(f"{c.name:<26}{c.budget_s:>5.0f} s  {c.title} (only with --only)")
        return 0
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    overrides = list(args.override)
    if args.smoke:
        overrides += ["sampling.height=64", "sampling.width=64", "sampling.steps=3", "sampling.grad_steps=1",
                      "train.grad_accum=1", *([] if cuda else ["memory.device=cpu", "memory.precision=fp32"])]
    checks = GPU_CHECKS if cuda or args.smoke else CPU_CHECKS
    if args.only:
        unknown = sorted(set(args.only) - set(CHECKS))
        if unknown:
            ap.error(f"unknown check(s) {unknown}; see --list")
        checks = [CHECKS[n] for n in args.only]
    checks = [dataclasses.replace(c, budget_s=c.budget_s * args.budget_scale) for c in checks]
    if cuda:
        device = torch.cuda.get_device_name(0)
        slug = sanitize_device_name(device)
        note = (f"CUDA GPU: {device}. GPU checks on SD1.5- and SDXL-architecture models with random weights (no "
                "download); "
                "each check in its own process, within its own time budget.")
    else:
        device, slug = f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "cpu-only"
        why = ("--cpu was given" if torch.cuda.is_available() else
               f"no CUDA GPU: PyTorch sees none (torch {torch.__version__}, "
               f"{'built with CUDA ' + str(torch.version.cuda) if torch.version.cuda else 'a CPU-only build'})")
        note = (f"{why}. Ran the quick CPU subset only (tiny model: an estimate, two steps, bench speed with one "
                "repeat); the GPU checks need a CUDA machine.")
    if args.smoke:
        slug = f"smoke-{slug}"
        note = f"SMOKE RUN (--smoke: the GPU checks shrunk to 64x64, T=3; numbers mean nothing). {note}"
    total = args.total_budget if args.total_budget is not None else (TOTAL_BUDGET_S if cuda else 120.0)
    isolate = {"yes": True, "no": False}.get(args.isolate, cuda)
    report: dict[str, Any] = {
        "schema": SCHEMA, "device": device, "device_slug": slug, "cuda": cuda,
        "mode": "gpu" if cuda else ("smoke" if args.smoke else "cpu-subset"), "note": note,
        "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "finished_at": None,
        "total_budget_s": total, "wall_s": 0.0, "environment": environment(cuda), "counts": {}, "checks": [],
    }
    out = Path(args.out)
    print(f"tc-lite gpu check: {note}\nwriting {out / slug}.json and .md")
    ctx = Context(extra_overrides=overrides, cuda=cuda)
    run_all(checks, ctx, isolate=isolate, total_budget=total, report=report, on_update=lambda r: write_report(r, out))
    json_path, md_path = write_report(report, out)
    counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items() if n)
    print(f"done in {report['wall_s']:.0f} s: {counts}\n  {json_path}\n  {md_path}")
    return 1 if report["counts"].get("failed") or report["counts"].get("timeout") else 0


if __name__ == "__main__":
    sys.exit(main())
