"""The prepared GPU check: one command, every part in a process of its own with its own limit.

    python -m benchmarks.gpu_check --out DIR              # full size on CUDA, tiny without
    python -m benchmarks.gpu_check --out DIR --mode tiny  # the same code on tiny inputs (CPU)
    make gpu-check OUT=DIR                                # installs the device bundle first

Writes DIR/gpu_check.json and DIR/gpu_check.md (one table), and prints each figure against its
target. A part that fails or runs past its limit is recorded as such; the others keep their
figures. The whole check stays within --budget seconds (8 minutes by default: a GPU command gets
at most 10).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check.parts import PARTS, REPO


def run_part(name: str, tiny: bool, out: Path) -> None:
    """In the part's own process: run it, write out/parts/<name>.json."""
    fn = PARTS[name][0]
    t0 = time.perf_counter()
    figures = fn(tiny, out)
    rec = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1), "figures": figures}
    (out / "parts" / f"{name}.json").write_text(json.dumps(rec, indent=1))


def _spawn(name: str, tiny: bool, out: Path, limit: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--part", name]
    cmd += ["--mode", "tiny" if tiny else "full"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    t0 = time.perf_counter()
    log = (out / "parts" / f"{name}.log").open("w")
    try:
        r = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=limit
        )
        status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f} s"
    finally:
        log.close()
    path = out / "parts" / f"{name}.json"
    if status == "ok" and path.exists():
        return dict(json.loads(path.read_text()))
    tail = (out / "parts" / f"{name}.log").read_text()[-1500:]
    return {
        "status": status,
        "seconds": round(time.perf_counter() - t0, 1),
        "figures": [],
        "log_tail": tail,
    }


def _mark(f: dict[str, Any]) -> str:
    return {True: "met", False: "MISSED", None: ""}[f["ok"]]


def _ratios(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Targets across parts (issue 13): Ray Train >= 0.9x the bare step, >= 3x CPU aug."""
    from benchmarks.gpu_check.parts import fig

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
            verdict = _mark(f)
            value = f"{f['value']:,}" if isinstance(f["value"], (int, float)) else str(f["value"])
            lines.append(
                f"| {name} | {f['name']} | {value} {f['unit']} | {f['target']} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--mode", choices=("auto", "full", "tiny"), default="auto",
                    help="auto: full on CUDA, tiny without")  # fmt: skip
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all parts")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part here
    args = ap.parse_args()
    out = Path(args.out).resolve()
    (out / "parts").mkdir(parents=True, exist_ok=True)
    tiny = args.mode == "tiny" or (args.mode == "auto" and not torch.cuda.is_available())
    if args.part:
        run_part(args.part, tiny, out)
        return 0
    names = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        print(f"unknown part(s) {unknown}: choose from {list(PARTS)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    parts: dict[str, Any] = {}
    for name in names:
        left = args.budget - (time.perf_counter() - start)
        limit = min(PARTS[name][2 if tiny else 1], left)
        if limit < 5:
            parts[name] = {"status": "skipped: budget spent", "seconds": 0, "figures": []}
            continue
        print(f"[gpu-check] {name} (limit {limit:.0f} s) ...", flush=True)
        parts[name] = _spawn(name, tiny, out, limit)
        for f in parts[name]["figures"]:
            target = f" (target {f['target']}: {_mark(f)})" if f["target"] else ""
            print(f"  {f['name']}: {f['value']} {f['unit']}{target}", flush=True)
        if parts[name]["status"] != "ok":
            print(f"  {parts[name]['status']}; log: {out}/parts/{name}.log", flush=True)
    ratios = _ratios(parts)
    if ratios:
        parts["ratios"] = {"status": "ok", "seconds": 0, "figures": ratios}
        for f in ratios:
            print(f"  {f['name']}: {f['value']} (target {f['target']}: {_mark(f)})", flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    report = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, GPU {gpu}",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "tiny" if tiny else "full",
        "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
        "seconds": round(time.perf_counter() - start, 1),
        "parts": parts,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    head = f"GPU check, {report['mode']} mode: {report['machine']}, torch {report['torch']}, "
    head += f"{report['date']}, {report['seconds']} s\n\n"
    (out / "gpu_check.md").write_text(head + _table(parts))
    print(f"[gpu-check] {report['seconds']} s; wrote {out}/gpu_check.json and gpu_check.md")
    return 0 if all(p["status"] == "ok" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
