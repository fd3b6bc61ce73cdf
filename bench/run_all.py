"""Run every ``bench/bench_*.py`` and write ``bench/results/BENCH.md``.

Each script exposes ``main()`` returning a dict and writes
``bench/results/<name>.json`` (``bench_index.py`` -> ``index.json``). A script
may put a ``headline`` list of ``{"name", "value", "unit"}`` in its dict: those
rows make its table in BENCH.md; otherwise its top-level numbers and any list
of row dicts (e.g. ``runs``) are tabulated. A failing script is reported and
the others still run (exit status 1 at the end). Benchmarks not run this time
keep their previous JSON and appear in BENCH.md marked as earlier results.

    python bench/run_all.py [--only index throughput] [--skip accuracy] [--list]
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GEOLOCATE_PROGRESS", "0")


# scripts whose results file is named by their issue, not by the script
RESULT_FILES = {"inference": "inference_ablation.json"}


def result_path(name: str) -> Path:
    return RESULTS / RESULT_FILES.get(name, f"{name}.json")


def scripts() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH.glob("bench_*.py"))}


def run_one(name: str, path: Path) -> dict:
    """Import and run one script's main(); never raises."""
    t0, started = time.perf_counter(), time.time()
    argv = sys.argv
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.argv = [str(path)]
        spec.loader.exec_module(mod)
        main = getattr(mod, "main")
        result = main([]) if inspect.signature(main).parameters else main()
        if not isinstance(result, dict):
            raise TypeError(f"{path.name}: main() returned {type(result).__name__}, not a dict")
        status = "ok"
    except BaseException as e:  # noqa: BLE001 - SystemExit from argparse too: report, go on
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc()
        result, status = {}, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        sys.argv = argv
    seconds = round(time.perf_counter() - t0, 1)
    out = result_path(name)
    if status == "ok" and (not out.exists() or out.stat().st_mtime < started):  # the script did not write it
        out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return {"name": name, "status": status, "seconds": seconds, "result": result}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v).replace("|", "\\|")


def section(name: str, result: dict) -> list[str]:
    """Markdown lines for one benchmark's result."""
    lines = []
    if result.get("what"):
        lines += [f"_{result['what']}_", ""]
    if isinstance(result.get("headline"), list) and result["headline"]:
        lines += ["| measure | value | unit |", "|---|---:|---|"]
        lines += [f"| {_fmt(h.get('name'))} | {_fmt(h.get('value'))} | {_fmt(h.get('unit', ''))} |" for h in result["headline"]]
        return lines + [""]
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        lines += ["| key | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()] + [""]
    for k, v in result.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            cols = list(dict.fromkeys(c for r in v for c in r if not isinstance(r[c], (dict, list))))
            lines += [f"**{k}**", "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in v] + [""]
    return lines or ["(no tabular numbers)", ""]


def write_markdown(ran: list[dict], path: Path = RESULTS / "BENCH.md") -> Path:
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}"
    done = {r["name"]: r for r in ran}
    lines = ["# Benchmarks", "", f"Written {now} by `make bench` (`python bench/run_all.py`) on {machine}.",
             "Absolute numbers depend on the machine and its load; ratios inside one benchmark were measured in one "
             "process at one time and are the numbers to compare.", "",
             "| benchmark | status | seconds | results |", "|---|---|---:|---|"]
    sections = []
    for name in scripts():
        json_path = result_path(name)
        if name in done:
            r = done[name]
            result, status, secs = r["result"], r["status"], _fmt(r["seconds"])
        elif json_path.exists():
            result = json.loads(json_path.read_text(encoding="utf-8"))
            when = dt.datetime.fromtimestamp(json_path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="minutes")
            status, secs = f"not run now (result of {when})", "–"
        else:
            result, status, secs = {}, "never run", "–"
        link = f"[{json_path.name}]({json_path.name})" if json_path.exists() else "–"
        lines.append(f"| {name} | {status} | {secs} | {link} |")
        if result:
            sections += [f"## {name}", ""] + section(name, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines + [""] + sections), encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these (names without bench_)")
    ap.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="skip these")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    found = scripts()
    if args.list:
        print("\n".join(found))
        return 0
    unknown = [n for n in (args.only or []) + args.skip if n not in found]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(found)}", file=sys.stderr)
        return 2
    names = [n for n in found if (not args.only or n in args.only) and n not in args.skip]
    RESULTS.mkdir(parents=True, exist_ok=True)
    ran = []
    for name in names:
        print(f"\n=== bench_{name} ===", flush=True)
        ran.append(run_one(name, found[name]))
        print(f"=== bench_{name}: {ran[-1]['status']} in {ran[-1]['seconds']} s ===", flush=True)
    md = write_markdown(ran)
    print(f"\nwritten {md}")
    for r in ran:
        print(f"  {r['name']:<12} {r['status']:<10} {r['seconds']:>8.1f} s")
    return 0 if all(r["status"] == "ok" for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
