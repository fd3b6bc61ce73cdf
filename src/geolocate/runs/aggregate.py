"""Cross-run ranking: ``runs/_aggregate/`` (runs_summary.csv, .parquet, dashboard.html).

``aggregate(runs_dir)`` reads every ``runs/*/summary.json`` (``_aggregate``,
``latest`` and other links or hidden entries skipped; a malformed summary
gives one warning naming it and is left out), flattens each into one row and
scores it. Selection uses the **validation** split, never test, so the test
numbers stay an unbiased report.

Score (higher is better), with ``km(d) = 1 - ln(1 + d) / ln(1 + 20015)``
(1 at 0 km, 0 at the antipode, 20 015 km)::

    score = 0.40 * val top-1 accuracy
          + 0.30 * km(val p90 km)
          + 0.30 * km(val median km)
          - 0.05 * (number of missing artifacts)

A metric the summary lacks contributes 0 (its worst value). The log scale
makes a 100 → 50 km gain count like 1000 → 500 km. Weights live in
:data:`WEIGHTS` and are printed on the aggregate page.

Runs on different datasets (``dataset.fingerprint``) are not comparable: ranks
(``rank``) are computed within each dataset group only, every row carries its
``dataset_group`` (D1, D2, ... by size), and when more than one group exists
the CLI and the page show a warning and ``mixed_datasets`` is true.
"""
from __future__ import annotations

import dataclasses as dc
import html
import json
import math
from pathlib import Path
from typing import Any

import polars as pl

from ..catalogue import direction, find, metric_column
from ..io import write_parquet, write_text
from .tracking import flatten as flat_dict

WEIGHTS = {"val_top1_acc": 0.40, "val_p90_km": 0.30, "val_median_km": 0.30, "missing_artifact": 0.05}
ANTIPODE_KM = 20015.0
SKIP = {"_aggregate", "latest"}
REQUIRED = ("run_id", "dataset", "metrics")

# column -> polars dtype: one stable schema for csv/parquet, whatever the runs hold
COLUMNS: dict[str, Any] = {
    "rank": pl.Int64, "dataset_group": pl.Utf8, "run_id": pl.Utf8, "score": pl.Float64,
    "val_top1_acc": pl.Float64, "val_top5_acc": pl.Float64, "val_median_km": pl.Float64, "val_p90_km": pl.Float64,
    "val_geoscore": pl.Float64,
    "test_top1_acc": pl.Float64, "test_top5_acc": pl.Float64, "test_median_km": pl.Float64, "test_p90_km": pl.Float64,
    "test_geoscore": pl.Float64, "test_acc_750km": pl.Float64,
    "knn_test_top1_acc": pl.Float64, "knn_test_median_km": pl.Float64, "prior_test_median_km": pl.Float64,
    "missing_artifacts": pl.Int64, "missing_list": pl.Utf8,
    "dataset_fingerprint": pl.Utf8, "images": pl.Int64, "cells": pl.Int64, "h3_resolution": pl.Int64,
    "backbone": pl.Utf8, "loss": pl.Utf8, "epochs": pl.Int64, "finetune_epochs": pl.Int64, "lr": pl.Float64,
    "batch_size": pl.Int64, "seed": pl.Int64, "epochs_run": pl.Int64, "best_epoch": pl.Int64, "stopped_early": pl.Boolean,
    "gate_promoted": pl.Boolean, "status": pl.Utf8, "created_at": pl.Utf8, "wall_time_s": pl.Float64,
    "schema_version": pl.Int64, "mixed_datasets": pl.Boolean, "run_dir": pl.Utf8,
}


@dc.dataclass
class AggregateResult:
    table: pl.DataFrame
    warnings: list[str]
    out_dir: Path | None = None

    @property
    def mixed(self) -> bool:
        return self.table.height > 0 and self.table["dataset_fingerprint"].n_unique() > 1


# ---- scoring ----------------------------------------------------------------------
def km_score(d: float | None) -> float:
    """1 at 0 km, 0 at the antipode (log scale); 0 for a missing value."""
    if d is None or not isinstance(d, (int, float)) or math.isnan(d):
        return 0.0
    return 1.0 - math.log1p(min(max(d, 0.0), ANTIPODE_KM)) / math.log1p(ANTIPODE_KM)


def score_run(val_top1_acc: float | None, val_p90_km: float | None, val_median_km: float | None, missing_artifacts: int) -> float:
    acc = val_top1_acc if isinstance(val_top1_acc, (int, float)) and not math.isnan(val_top1_acc) else 0.0
    return (WEIGHTS["val_top1_acc"] * acc + WEIGHTS["val_p90_km"] * km_score(val_p90_km)
            + WEIGHTS["val_median_km"] * km_score(val_median_km) - WEIGHTS["missing_artifact"] * missing_artifacts)


# ---- reading runs ---------------------------------------------------------------------
def run_dirs(runs_dir: str | Path) -> list[Path]:
    """Real run folders (links such as ``latest``, ``_aggregate`` and hidden entries skipped)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.is_symlink() and p.name not in SKIP and not p.name.startswith((".", "_")))


def read_summary(run_dir: Path) -> dict:
    """The run's summary, or ValueError saying what is wrong with it."""
    path = run_dir / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("no summary.json (run unfinished?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"missing keys: {', '.join(missing)}")
    if not isinstance(data["metrics"], dict) or not isinstance(data["dataset"], dict):
        raise ValueError("metrics and dataset must be objects")
    return data


def _num(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def missing_artifacts(run_dir: Path, summary: dict) -> list[str]:
    """Artifacts the summary flags as absent or that are gone from disk now, plus a missing dashboard."""
    flags = summary.get("artifacts") if isinstance(summary.get("artifacts"), dict) else {}
    names = list(dict.fromkeys([*flags, "dashboard.html"]))
    return [n for n in names if not flags.get(n, True) or not (run_dir / n).exists()]


def flatten(run_dir: Path, s: dict) -> dict:
    """One table row for a run (missing values as None)."""
    m, b, ds = s.get("metrics") or {}, s.get("baselines") or {}, s.get("dataset") or {}
    cfg, tr, gate = s.get("config") or {}, s.get("training") or {}, s.get("gate") or {}
    miss = missing_artifacts(run_dir, s)
    row = {
        "run_id": str(s.get("run_id") or run_dir.name), "run_dir": run_dir.name, "status": s.get("status"),
        "created_at": s.get("created_at"), "wall_time_s": _num(s, "wall_time_s"), "schema_version": _num(s, "schema_version"),
        "dataset_fingerprint": str(ds.get("fingerprint") or "unknown"), "images": _num(ds, "images"), "cells": _num(ds, "cells"),
        "h3_resolution": _num(ds, "h3_resolution"),
        "backbone": cfg.get("backbone"), "loss": cfg.get("loss"), "epochs": _num(cfg, "epochs"),
        "finetune_epochs": _num(cfg, "finetune_epochs"), "lr": _num(cfg, "lr"), "batch_size": _num(cfg, "batch_size"),
        "seed": _num(cfg, "seed"), "epochs_run": _num(tr, "epochs_run"), "best_epoch": _num(tr, "best_epoch"),
        "stopped_early": tr.get("stopped_early") if isinstance(tr.get("stopped_early"), bool) else None,
        "gate_promoted": gate.get("promoted") if isinstance(gate.get("promoted"), bool) else None,
        "missing_artifacts": len(miss), "missing_list": ", ".join(miss),
        "knn_test_top1_acc": _num(b, "knn", "test", "top1_acc"), "knn_test_median_km": _num(b, "knn", "test", "median_km"),
        "prior_test_median_km": _num(b, "prior", "test", "median_km"),
    }
    for split in ("val", "test"):
        for key in ("top1_acc", "top5_acc", "median_km", "p90_km", "geoscore", "acc_750km"):
            col = f"{split}_{key}"
            if col in COLUMNS:
                row[col] = _num(m, split, key)
    row["score"] = round(score_run(row["val_top1_acc"], row["val_p90_km"], row["val_median_km"], row["missing_artifacts"]), 6)
    return row


def collect(runs_dir: str | Path) -> AggregateResult:
    """Read and rank every run (nothing written). Malformed summaries become warnings."""
    rows, warnings = [], []
    for d in run_dirs(runs_dir):
        try:
            s = read_summary(d)
        except ValueError as e:
            warnings.append(f"skipping {d / 'summary.json'}: {e}")
            continue
        rows.append(flatten(d, s))
    table = rank(rows)
    if table.height and table["dataset_fingerprint"].n_unique() > 1:
        groups = table.group_by("dataset_group", "dataset_fingerprint").len().sort("dataset_group")
        desc = ", ".join(f"{g} = {fp} ({n} runs)" for g, fp, n in groups.iter_rows())
        warnings.append(f"runs use {groups.height} different datasets ({desc}): ranks are within each dataset only; "
                        "scores across datasets are not comparable")
    return AggregateResult(table, warnings)


def rank(rows: list[dict]) -> pl.DataFrame:
    """Rows -> table with dataset groups (D1 = most runs) and ranks within each group by score."""
    if not rows:
        return pl.DataFrame(schema=COLUMNS)
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["dataset_fingerprint"]] = sizes.get(r["dataset_fingerprint"], 0) + 1
    order = sorted(sizes, key=lambda fp: (-sizes[fp], fp))
    label = {fp: f"D{i + 1}" for i, fp in enumerate(order)}
    mixed = len(order) > 1
    out = []
    for fp in order:
        group = [r for r in rows if r["dataset_fingerprint"] == fp]
        group.sort(key=lambda r: (-r["score"], r["val_median_km"] if r["val_median_km"] is not None else math.inf, r["run_id"]))
        for i, r in enumerate(group, 1):
            out.append(r | {"rank": i, "dataset_group": label[fp], "mixed_datasets": mixed})
    return pl.DataFrame([{c: r.get(c) for c in COLUMNS} for r in out], schema=COLUMNS)


def aggregate(runs_dir: str | Path, out_dir: str | Path | None = None) -> AggregateResult:
    """Rank every run and write ``runs_summary.csv``, ``runs_summary.parquet`` and ``dashboard.html``."""
    runs_dir = Path(runs_dir)
    res = collect(runs_dir)
    out = Path(out_dir) if out_dir else runs_dir / "_aggregate"
    write_text(out / "runs_summary.csv", res.table.write_csv())
    write_parquet(out / "runs_summary.parquet", res.table)
    write_text(out / "dashboard.html", render_aggregate(res))
    res.out_dir = out
    return res


# ---- comparing two runs ---------------------------------------------------------------
def resolve_run(ref: str | Path, runs_dir: str | Path) -> Path:
    """A run folder from a path, a run id, ``latest`` or a unique run-id prefix."""
    runs_dir = Path(runs_dir)
    p = Path(ref)
    for cand in (p, runs_dir / str(ref)):
        if cand.is_dir() and (cand / "summary.json").exists():
            return cand.resolve()
    matches = [d for d in run_dirs(runs_dir) if d.name.startswith(str(ref))]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise FileNotFoundError(f"run {ref!r} is ambiguous in {runs_dir}: {', '.join(d.name for d in matches[:5])}")
    raise FileNotFoundError(f"no run {ref!r} (a folder with summary.json) in {runs_dir} or as a path")


def compare(a: Path, b: Path) -> dict:
    """Metric deltas (b - a) for model and baselines on val/test, and the config diff."""
    sa, sb = read_summary(a), read_summary(b)
    rows = []
    pairs = [("model", sa.get("metrics") or {}, sb.get("metrics") or {})]
    for base in ("knn", "prior"):
        pairs.append((base, (sa.get("baselines") or {}).get(base) or {}, (sb.get("baselines") or {}).get(base) or {}))
    for who, ma, mb in pairs:
        for split in ("val", "test"):
            xa, xb = ma.get(split) or {}, mb.get(split) or {}
            for key in dict.fromkeys([*xa, *xb]):
                va, vb = _num(xa, key), _num(xb, key)
                if va is None and vb is None or key == "n":
                    continue
                delta = vb - va if va is not None and vb is not None else None
                m, better = find(key), None
                if delta is not None and delta != 0 and m is not None and m.direction is not None:
                    better = "b" if m.better(vb, va) else "a"
                rows.append({"predictor": who, "split": split, "metric": key, "a": va, "b": vb, "delta": delta, "better": better})

    def cfg(run: Path, s: dict) -> dict:
        try:
            return flat_dict(json.loads((run / "config.json").read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            return flat_dict(s.get("config") or {})

    ca, cb = cfg(a, sa), cfg(b, sb)
    diff = [{"key": k, "a": ca.get(k), "b": cb.get(k)} for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    fa, fb = (sa.get("dataset") or {}).get("fingerprint"), (sb.get("dataset") or {}).get("fingerprint")
    return {"a": sa.get("run_id", a.name), "b": sb.get("run_id", b.name), "same_dataset": fa == fb,
            "fingerprints": [fa, fb], "metrics": rows, "config_diff": diff,
            "score": [flatten(a, sa)["score"], flatten(b, sb)["score"]]}


# ---- the aggregate page ------------------------------------------------------------------
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var tb=t.tBodies[0], rows=Array.prototype.slice.call(tb.rows), asc=th.getAttribute('data-dir')!=='asc';
      t.querySelectorAll('th').forEach(function(h){h.removeAttribute('data-dir');});
      th.setAttribute('data-dir',asc?'asc':'desc');
      rows.sort(function(a,b){
        var x=a.cells[i].getAttribute('data-v'), y=b.cells[i].getAttribute('data-v');
        if(x===''||x===null) return 1; if(y===''||y===null) return -1;
        var nx=parseFloat(x), ny=parseFloat(y), c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);
        return asc?c:-c;});
      rows.forEach(function(r){tb.appendChild(r);});
    });
  });
});
"""

PAGE_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2329}
header{background:#12263a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}
main{padding:18px 28px}section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 18px;margin:0 0 16px;overflow-x:auto}
h2{font-size:16px;margin:0 0 10px}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 9px;border-bottom:1px solid #e6e8eb;text-align:right;white-space:nowrap}
th{background:#f0f2f4;cursor:pointer;user-select:none}th[data-dir=asc]::after{content:' ▲'}th[data-dir=desc]::after{content:' ▼'}
td.l,th.l{text-align:left}tr.first td{font-weight:600}
.warn{background:#fff4e5;border-left:4px solid #f0a202;padding:8px 12px;margin:0 0 16px}
.g0{border-left:4px solid #3b82f6}.g1{border-left:4px solid #f59e0b}.g2{border-left:4px solid #10b981}.g3{border-left:4px solid #ef4444}
.g4{border-left:4px solid #8b5cf6}code{background:#f0f2f4;color:#1d2329;padding:1px 4px;border-radius:3px}
h1,p{overflow-wrap:anywhere}
@media (max-width:600px){header{padding:14px 12px}main{padding:12px 8px}section{padding:10px}}
"""

SHOWN = [("dataset_group", "dataset", "s"), ("rank", "rank", "i"), ("run_id", "run", "s"), ("score", "score", "f3"),
         *map(metric_column, ("val_top1_acc", "val_median_km", "val_p90_km", "test_top1_acc", "test_median_km", "test_p90_km",
                              "test_geoscore", "knn_test_median_km", "prior_test_median_km")),
         ("missing_artifacts", "missing artifacts", "i"),
         ("backbone", "backbone", "s"), ("loss", "loss", "s"), ("epochs_run", "epochs", "i"), ("images", "images", "i"),
         ("cells", "cells", "i"), ("created_at", "created", "s")]


def _cell(v: Any, kind: str) -> str:
    """A table value: ``kind`` is a catalogued metric's name, ``f3`` (3 decimals) or anything else (as text)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    m = find(kind)
    if m is not None:
        return m.fmt(v)
    return f"{v:.3f}" if kind == "f3" else str(v)


def render_aggregate(res: AggregateResult) -> str:
    e = html.escape
    t = res.table
    groups = t.select("dataset_group", "dataset_fingerprint").unique().sort("dataset_group") if t.height else t
    gidx = {g: i % 5 for i, (g, _) in enumerate(groups.iter_rows())} if t.height else {}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>geolocate — all runs</title>", f"<style>{PAGE_CSS}</style></head><body>",
             f"<header><h1>All runs: {t.height} ranked</h1></header><main>"]
    for w in res.warnings:
        parts.append(f'<div class="warn"><b>warning:</b> {e(w)}</div>')
    if res.mixed:
        parts.append('<div class="warn"><b>Mixed datasets.</b> These runs were trained on different data '
                     "(<code>dataset.fingerprint</code>). Ranks below are within each dataset group; "
                     "never compare scores across groups.</div>")
    # the table
    head = "".join(f'<th class="{"l" if kind == "s" else ""}">{e(label)}</th>' for _, label, kind in SHOWN)
    body = []
    for r in t.iter_rows(named=True):
        tds = []
        for col, _, kind in SHOWN:
            v = r.get(col)
            dv = "" if v is None else str(v)
            text = e(_cell(v, kind))
            if col == "run_id":
                text = f'<a href="../{e(r["run_dir"])}/dashboard.html">{e(str(v))}</a>'
            elif col == "dataset_group":
                text = f'{e(str(v))} <code title="{e(r["dataset_fingerprint"])}">{e(r["dataset_fingerprint"][:8])}</code>'
            elif col == "missing_artifacts" and r.get("missing_list"):
                text = f'<span title="{e(r["missing_list"])}">{text}</span>'
            tds.append(f'<td class="{"l" if kind == "s" else ""}" data-v="{e(dv)}">{text}</td>')
        cls = f'g{gidx.get(r["dataset_group"], 0)}' + (" first" if r["rank"] == 1 else "")
        body.append(f'<tr class="{cls}">' + "".join(tds) + "</tr>")
    parts.append('<section><h2>Runs (click a column to sort)</h2><table class="sortable"><thead><tr>' + head
                 + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></section>")
    # best per dataset
    if t.height:
        best = t.filter(pl.col("rank") == 1)
        items = "".join(f'<li>{e(g)} (<code>{e(fp)}</code>, {n} runs): <a href="../{e(d)}/dashboard.html">{e(rid)}</a> '
                        f"score {s:.3f}</li>"
                        for g, fp, rid, d, s, n in zip(best["dataset_group"], best["dataset_fingerprint"], best["run_id"],
                                                       best["run_dir"], best["score"],
                                                       [t.filter(pl.col("dataset_group") == g).height for g in best["dataset_group"]]))
        parts.append(f"<section><h2>Best run per dataset</h2><ul>{items}</ul></section>")
    # how the score is made
    w = WEIGHTS
    parts.append(
        "<section><h2>Score</h2><p>Ranking uses the validation split (the test split stays an unbiased report). "
        "With <code>km(d) = 1 − ln(1 + d) / ln(1 + 20015)</code> (1 at 0 km, 0 at the antipode):</p>"
        f"<p><code>score = {w['val_top1_acc']:.2f} × val top-1 accuracy + {w['val_p90_km']:.2f} × km(val p90 km) "
        f"+ {w['val_median_km']:.2f} × km(val median km) − {w['missing_artifact']:.2f} × missing artifacts</code></p>"
        "<table><tr><th class=\"l\">criterion</th><th>weight</th><th class=\"l\">direction</th></tr>"
        f"<tr><td class=\"l\">val top-1 accuracy</td><td>{w['val_top1_acc']:.2f}</td><td class=\"l\">{direction('top1_acc')} is better</td></tr>"
        f"<tr><td class=\"l\">val p90 error (km, log)</td><td>{w['val_p90_km']:.2f}</td><td class=\"l\">{direction('p90_km')} is better</td></tr>"
        f"<tr><td class=\"l\">val median error (km, log)</td><td>{w['val_median_km']:.2f}</td><td class=\"l\">{direction('median_km')} is better</td></tr>"
        f"<tr><td class=\"l\">each missing artifact</td><td>−{w['missing_artifact']:.2f}</td><td class=\"l\">penalty</td></tr></table>"
        "<p>Missing metrics count as their worst value. Files: <a href=\"runs_summary.csv\">runs_summary.csv</a>, "
        "<a href=\"runs_summary.parquet\">runs_summary.parquet</a>.</p></section>")
    parts.append(f"</main><script>{SORT_JS}</script></body></html>\n")
    return "\n".join(parts)
