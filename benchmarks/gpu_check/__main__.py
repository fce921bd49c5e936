"""The prepared GPU check: one command, every part in a process of its own with its own limit.

    python -m benchmarks.gpu_check --out DIR              # full size on CUDA, tiny without
    python -m benchmarks.gpu_check --out DIR --mode tiny  # the same code on tiny inputs (CPU)
    python -m benchmarks.gpu_check --out DIR --parts ray_train,step   # a subset
    make gpu-check OUT=DIR [MODE=tiny] [PARTS=a,b]        # installs the device bundle first

Writes DIR/gpu_check.json and DIR/gpu_check.md (one table) after every part, so a run cut short
(by a part's limit or the machine's) leaves what it measured; a part's own figures are on disk
as it measures them (DIR/parts/<name>.json). A part that fails or runs past its limit is
recorded as such, with the figures it had; the others keep theirs. At full size the parts'
limits add up to `parts.BUDGET_S` (7 minutes), and --budget caps the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check.common import REPO, PartContext, fig, part_file
from benchmarks.gpu_check.parts import BUDGET_S, PARTS, Part


def run_part(part: Part, tiny: bool, out: Path) -> None:
    """In the part's own process: run it, its figures written as they come, then "ok"."""
    ctx = PartContext(part.name, tiny, out)
    ctx.write("running")
    if tiny and not torch.cuda.is_available():
        # one intra-op thread: the part shares a small CPU with the Ray workers and loader
        # workers it starts, and OpenMP threads that outnumber the cores spin against them
        torch.set_num_threads(1)
    part.fn()(ctx)
    ctx.write("ok")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End the part's process group (what a finished part left behind, or a cut part)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    proc.wait()


def _spawn(part: Part, tiny: bool, out: Path, limit: float) -> dict[str, Any]:
    name = part.name
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--part", name]
    cmd += ["--target", part.target, "--mode", "tiny" if tiny else "full"]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    log_path = out / "parts" / f"{name}.log"
    with log_path.open("w") as log:
        # a session of its own: a part cut by its limit goes with everything it started (its
        # ranks, its local Ray cluster), which would otherwise hold the device for the next
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": path}, start_new_session=True,
        )  # fmt: skip
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
        finally:
            _kill_group(proc)
    rec: dict[str, Any] = {"figures": []}
    if part_file(out, name).exists():
        rec = json.loads(part_file(out, name).read_text())
    if status == "ok" and rec.get("status") == "ok":
        return rec
    return {
        "status": status if status != "ok" else "failed (no result written)",
        "seconds": round(time.perf_counter() - t0, 1),
        "figures": rec["figures"],  # what it measured before it stopped
        "log_tail": log_path.read_text()[-1500:],
    }


def _mark(f: dict[str, Any]) -> str:
    return {True: "met", False: "MISSED", None: ""}[f["ok"]]


def _ratios(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Targets across parts (issue 13): Ray Train >= 0.9x the bare step, >= 3x CPU aug."""
    v = {f["name"]: f["value"] for p in parts.values() for f in p["figures"]}
    ray = v.get("sepp through Ray Train")
    out = []
    for name, target in (("bare eager", 0.9), ("cpu torchvision aug DataLoader", 3.0)):
        if isinstance(ray, float) and v.get(name):
            r = ray / v[name]
            out.append(fig(f"Ray Train / {name}", round(r, 3), "x", f">= {target}", r >= target))
    return out


def _table(parts: dict[str, Any]) -> str:
    lines = ["| part | figure | value | target | verdict |", "|---|---|---|---|---|"]
    for name, rec in parts.items():
        if rec["status"] != "ok":
            lines.append(f"| {name} | - | {rec['status']} | - | FAILED |")
        for f in rec["figures"]:
            value = f"{f['value']:,}" if isinstance(f["value"], (int, float)) else str(f["value"])
            lines.append(
                f"| {name} | {f['name']} | {value} {f['unit']} | {f['target']} | {_mark(f)} |"
            )
    return "\n".join(lines) + "\n"


def write_report(out: Path, tiny: bool, start: float, parts: dict[str, Any]) -> dict[str, Any]:
    """gpu_check.json and gpu_check.md with the parts so far (called after every part)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    ratios = _ratios(parts)
    every = {**parts, "ratios": {"status": "ok", "seconds": 0, "figures": ratios}}
    report: dict[str, Any] = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, GPU {gpu}",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "tiny" if tiny else "full",
        "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
        "seconds": round(time.perf_counter() - start, 1),
        "parts": every if ratios else parts,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    head = f"GPU check, {report['mode']} mode: {report['machine']}, torch {report['torch']}, "
    head += f"{report['date']}, {report['seconds']} s\n\n"
    (out / "gpu_check.md").write_text(head + _table(report["parts"]))
    return report


def _say(rec: dict[str, Any], out: Path, name: str) -> None:
    for f in rec["figures"]:
        target = f" (target {f['target']}: {_mark(f)})" if f["target"] else ""
        print(f"  {f['name']}: {f['value']} {f['unit']}{target}", flush=True)
    if rec["status"] != "ok":
        print(f"  {rec['status']}; log: {out}/parts/{name}.log", flush=True)


def run_all(chosen: list[Part], tiny: bool, out: Path, budget: float) -> dict[str, Any]:
    """Every chosen part in turn, each within its limit and what is left of ``budget``; the
    report is rewritten after each."""
    start = time.perf_counter()
    parts: dict[str, Any] = {}
    for part in chosen:
        name = part.name
        left = budget - (time.perf_counter() - start)
        limit = min(part.limit(tiny), left)
        if limit < 5:
            parts[name] = {"status": "skipped: budget spent", "seconds": 0, "figures": []}
        else:
            print(f"[gpu-check] {name} (limit {limit:.0f} s) ...", flush=True)
            parts[name] = _spawn(part, tiny, out, limit)
            _say(parts[name], out, name)
        report = write_report(out, tiny, start, parts)
    for f in report["parts"].get("ratios", {"figures": []})["figures"]:
        print(f"  {f['name']}: {f['value']} (target {f['target']}: {_mark(f)})", flush=True)
    print(f"[gpu-check] {report['seconds']} s; wrote {out}/gpu_check.json and gpu_check.md")
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--mode", choices=("auto", "full", "tiny"), default="auto",
                    help="auto: full on CUDA, tiny without")  # fmt: skip
    ap.add_argument("--parts", default="", help=f"comma-separated subset of {','.join(PARTS)}")
    budget_help = f"seconds for all parts (default: {BUDGET_S} at full size; tiny: the sum of "
    budget_help += "the parts' tiny limits, as a slow CPU must not skip a part)"
    ap.add_argument("--budget", type=float, default=None, help=budget_help)
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part here ...
    ap.add_argument("--target", help=argparse.SUPPRESS)  # ... this function
    args = ap.parse_args()
    out = Path(args.out).resolve()
    (out / "parts").mkdir(parents=True, exist_ok=True)
    tiny = args.mode == "tiny" or (args.mode == "auto" and not torch.cuda.is_available())
    if args.part:
        run_part(Part(args.part, args.target, 0, 0), tiny, out)
        return 0
    names = [p for p in args.parts.split(",") if p] or list(PARTS)
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        print(f"unknown part(s) {unknown}: choose from {list(PARTS)}", file=sys.stderr)
        return 2
    chosen = [PARTS[n] for n in names]
    budget = args.budget or (sum(p.tiny_limit_s for p in chosen) if tiny else BUDGET_S)
    report = run_all(chosen, tiny, out, budget)
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
