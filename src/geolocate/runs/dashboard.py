"""One self-contained HTML page per run: ``runs/<run_id>/dashboard.html``.

``write_dashboard(run_dir)`` reads only files inside ``run_dir`` (summary.json,
config.json, metrics.csv, predictions_test.parquet, plots/*.png), draws the
world map of test errors (``plots/error_map.png``: true -> predicted lines
coloured by km over a downsampled NASA Blue Marble), and writes one HTML file
with every plot embedded as a base64 PNG data URI: no CDN, no external
JS/CSS, no network. Links to the other artifacts are relative, so the run
folder can be moved, zipped or served as it is.
"""
from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..catalogue import find, metric, table_metrics
from ..io import save_figure, write_text
from .artifacts import PLOTS

ERROR_MAP = "error_map.png"
CARD_METRICS = ("top1_acc", "top5_acc", "median_km", "p90_km", "geoscore", "acc_750km")  # the key-metric cards, in order
DASHBOARD = "dashboard.html"
PLOT_TITLES = {
    "loss.png": "Loss per epoch",
    "val_accuracy.png": "Validation accuracy",
    "geo_error_cdf.png": "Geo error CDF (test)",
    "confusion_matrix.png": "Confusion matrix (test)",
    ERROR_MAP: "World map of test errors (true → predicted)",
    "reliability.png": "Reliability before/after temperature scaling",
    "conformal_recall_area.png": "Conformal cell sets: recall vs area (test)",
    "selective.png": "Selective prediction: coverage vs accuracy and median km (test)",
    "ood_scores.png": "Out-of-distribution score (val, test) and its threshold",
}
ARTIFACT_FILES = ["summary.json", "config.json", "metrics.csv", "REPORT.md", "predictions_test.parquet",
                  "checkpoints/model.pt", "checkpoints/last.pt"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2329}
header{background:#12263a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}
header .sub{opacity:.8;font-size:13px;margin-top:4px;overflow-wrap:anywhere}
header code{background:#e8eef5;color:#12263a;font-weight:600}
main{padding:18px 28px;max-width:1300px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 18px;margin:0 0 16px;overflow-x:auto}
h2{font-size:16px;margin:0 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:10px 16px;min-width:140px}
.card .v{font-size:22px;font-weight:600}.card .k{font-size:12px;color:#5b6670}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 10px;border-bottom:1px solid #e6e8eb;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f2f4}
.best{font-weight:700;color:#0b6e4f}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(520px,100%),1fr));gap:14px}
.plots figure{margin:0}.plots img{max-width:100%;border:1px solid #e6e8eb}
.plots figure.wide{grid-column:1/-1}
figcaption{font-size:12px;color:#5b6670}
.missing{color:#b00020}.warn{background:#fff4e5;border-left:4px solid #f0a202;padding:8px 12px}
code{background:#f0f2f4;padding:1px 4px;border-radius:3px}
ul.links{columns:2}
h1{overflow-wrap:anywhere}
@media (max-width:600px){header{padding:14px 12px}main{padding:12px 8px}section{padding:10px}ul.links{columns:1}}
"""


def write_dashboard(run_dir: str | Path) -> Path:
    """Write ``run_dir/dashboard.html`` (and ``plots/error_map.png``); return the page's path."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    if not isinstance(summary, dict):
        raise FileNotFoundError(f"{run_dir}: no readable summary.json to build a dashboard from")
    preds = run_dir / "predictions_test.parquet"
    if preds.exists():
        plot_error_map(preds, run_dir / "plots" / ERROR_MAP)
    page = render_dashboard(run_dir, summary)
    return write_text(run_dir / DASHBOARD, page)


# ---- the error map ------------------------------------------------------------
def plot_error_map(predictions: Path, path: Path, max_lines: int = 4000) -> Path | None:
    """True -> predicted lines of the test set coloured by error km over the Blue Marble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm

    df = pl.read_parquet(predictions)
    need = {"lat", "lon", "pred_lat", "pred_lon", "error_km"}
    if df.height == 0 or not need <= set(df.columns):
        return None
    if df.height > max_lines:
        df = df.sample(max_lines, seed=0)
    lat, lon = df["lat"].to_numpy(), df["lon"].to_numpy()
    plat, plon = df["pred_lat"].to_numpy(), df["pred_lon"].to_numpy().copy()
    err = np.maximum(df["error_km"].to_numpy().astype(float), 1.0)
    # draw the short way round: a line crossing the antimeridian leaves the map at its edge
    plon = np.where(plon - lon > 180, plon - 360, np.where(plon - lon < -180, plon + 360, plon))
    fig, ax = plt.subplots(figsize=(11, 5.7))
    try:
        from ..sources.earth import load_imagery

        ax.imshow(load_imagery("bmng")[::6, ::6], extent=(-180, 180, -90, 90), alpha=0.9, zorder=0)
    except Exception:  # noqa: BLE001 - a missing background must not cost the map
        ax.set_facecolor("#1b3a5c")
    lo = max(1.0, float(np.percentile(err, 2)) / 2)
    norm = LogNorm(vmin=lo, vmax=max(float(err.max()), lo * 10))
    order = np.argsort(-err)  # short errors drawn last, on top
    segs = np.stack([np.c_[lon, lat], np.c_[plon, plat]], axis=1)[order]
    lc = LineCollection(segs, cmap="plasma", norm=norm, linewidths=0.9, alpha=0.85, zorder=2)
    lc.set_array(err[order])
    ax.add_collection(lc)
    ax.scatter(lon, lat, s=6, c="white", edgecolors="black", linewidths=0.3, zorder=3, label="true location")
    ax.scatter(plon, plat, s=14, marker="x", c="#00e5ff", linewidths=0.8, zorder=3, label="predicted cell centre")
    fig.colorbar(lc, ax=ax, fraction=0.025, pad=0.01, label="error (km, log scale)")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(f"Test errors: {df.height} images, median {np.median(df['error_km'].to_numpy()):,.0f} km")
    ax.legend(loc="lower left", fontsize=8, markerscale=1.5)
    return save_figure(fig, path, dpi=90)


# ---- the page --------------------------------------------------------------------
def render_dashboard(run_dir: Path, summary: dict) -> str:
    e = html.escape
    run_id = str(summary.get("run_id", run_dir.name))
    ds = summary.get("dataset") or {}
    metrics = summary.get("metrics") or {}
    base = summary.get("baselines") or {}
    training = summary.get("training") or {}
    gate = summary.get("gate") or {}
    test = metrics.get("test") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>geolocate run {e(run_id)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<header><h1>Run {e(run_id)}</h1><div class=\"sub\">created {e(str(summary.get('created_at', '–')))} · "
        f"status {e(str(summary.get('status', '–')))} · wall time {_num(summary.get('wall_time_s'), 's')} · "
        f"dataset <code>{e(str(ds.get('fingerprint', '–')))}</code> · schema v{e(str(summary.get('schema_version', '–')))}</div></header>",
        "<main>",
    ]
    # key numbers
    cards = [
        *((f"test {metric(k).label}", metric(k).fmt(test.get(k))) for k in CARD_METRICS),
        ("epochs run", str(training.get("epochs_run", "–"))),
        (f"gate {gate.get('metric', '')}", ("promoted" if gate.get("promoted") else "kept previous") if gate else "–"),
    ]
    parts.append('<section><h2>Key metrics</h2><div class="cards">' + "".join(
        f'<div class="card"><div class="v">{e(v)}</div><div class="k">{e(k)}</div></div>' for k, v in cards) + "</div></section>")
    # model vs baselines
    for split in ("test", "val"):
        cols = {"model": metrics.get(split) or {}, "prior": (base.get("prior") or {}).get(split) or {},
                f"kNN (k={(summary.get('config') or {}).get('knn_k', 1)})": (base.get("knn") or {}).get(split) or {}}
        n = (metrics.get(split) or {}).get("n")
        parts.append(f"<section><h2>Model vs baselines — {split} split{f' (n={n})' if n is not None else ''}</h2>"
                     + metrics_html(cols) + "</section>")
    parts.append(confidence_html(summary))
    # training + gate
    tr_rows = {
        "epochs run": training.get("epochs_run"), "best epoch": training.get("best_epoch"),
        f"best val {metric('median_km').label}": metric("median_km").fmt(training.get("best_val_median_km")),
        f"best val {metric('top1_acc').label}": metric("top1_acc").fmt(training.get("best_val_acc")),
        "stopped early": training.get("stopped_early"),
        "gate": _gate_line(gate) if gate else None,
    }
    parts.append("<section><h2>Training</h2>" + kv_table(tr_rows) + epochs_table(run_dir / "metrics.csv") + "</section>")
    # dataset
    splits = ds.get("splits") or {}
    ds_rows = {
        "fingerprint": ds.get("fingerprint"), "images": ds.get("images"), "H3 cells (classes)": ds.get("cells"),
        "H3 resolution": ds.get("h3_resolution"),
        "splits": ", ".join(f"{k} {v}" for k, v in sorted(splits.items(), key=lambda kv: ("train", "val", "test").index(kv[0]) if kv[0] in ("train", "val", "test") else 9)),
        "sources": ", ".join(f"{k} {v}" for k, v in (ds.get("sources") or {}).items()),
    }
    parts.append("<section><h2>Dataset</h2>" + kv_table(ds_rows) + "</section>")
    # config
    cfg = summary.get("config") or {}
    parts.append("<section><h2>Config</h2>" + kv_table(cfg) + '<p>Full resolved config: <a href="config.json">config.json</a></p></section>')
    # plots
    figs = []
    from .confidence import PLOTS as CONFIDENCE_PLOTS  # shown when the run has them (older runs do not)

    extra = [n for n in CONFIDENCE_PLOTS if (run_dir / "plots" / n).is_file()]
    for name in dict.fromkeys([*PLOTS, ERROR_MAP, *extra]):
        uri = png_data_uri(run_dir / "plots" / name)
        title = e(PLOT_TITLES.get(name, name))
        wide = ' class="wide"' if name == ERROR_MAP else ""
        if uri:
            figs.append(f'<figure{wide}><img alt="{title}" src="{uri}"><figcaption>{title} — '
                        f'<a href="plots/{e(name)}">plots/{e(name)}</a></figcaption></figure>')
        else:
            figs.append(f'<figure{wide}><div class="missing">{title}: plots/{e(name)} is missing</div></figure>')
    parts.append('<section><h2>Plots</h2><div class="plots">' + "".join(figs) + "</div></section>")
    # artifacts
    flags = dict(summary.get("artifacts") or {})
    names = list(dict.fromkeys([*ARTIFACT_FILES, *flags, *(f"plots/{p}" for p in [*PLOTS, ERROR_MAP])]))
    items = []
    for n in names:
        ok = n == DASHBOARD or (run_dir / n).exists()  # this page is being written
        items.append(f'<li><a href="{e(n)}">{e(n)}</a></li>' if ok else f'<li class="missing">{e(n)} (missing)</li>')
    parts.append('<section><h2>Artifacts</h2><ul class="links">' + "".join(items) + "</ul>"
                 '<p>All links are relative to this run folder; the aggregate over all runs is '
                 '<a href="../_aggregate/dashboard.html">../_aggregate/dashboard.html</a> '
                 "(after <code>geolocate runs aggregate</code>).</p></section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def confidence_html(summary: dict) -> str:
    """The "Honest confidence" section: conformal sets, selective prediction, the OOD flag ("" without them)."""
    from .confidence import confidence_label, report_lines

    e = html.escape
    cf, sel, ood = summary.get("conformal"), summary.get("selective"), summary.get("ood")
    if not (cf or sel or ood):
        return ""
    lines = report_lines(summary)

    def para(prefix: str) -> str:
        text = next((line for line in lines if line.startswith(prefix)), "")
        return f"<p>{e(_md_plain(text))}</p>" if text else ""

    out = ["<section><h2>Honest confidence</h2>"]
    if cf:
        out.append(para("**Conformal"))
        head = "<tr><th>target coverage</th><th>coverage</th><th>mean cells</th><th>mean area</th></tr>"
        body = "".join(f"<tr><td>{float(k):.0%}</td><td>{_pct(v.get('coverage'))}</td><td>{_num(v.get('mean_cells'))}</td>"
                       f"<td>{_area(v.get('mean_area_km2'))}</td></tr>" for k, v in (cf.get("targets") or {}).items())
        out.append(f"<table>{head}{body}</table>")
    if sel:
        km = metric("median_km")
        head = "<tr><th>min confidence</th><th>answered</th><th>coverage</th><th>top-1 acc</th><th>median km</th></tr>"
        body = "".join(f"<tr><td>{confidence_label(k)}</td><td>{v.get('answered')}</td><td>{_pct(v.get('coverage'))}</td>"
                       f"<td>{_pct(v.get('top1_acc'))}</td><td>{e(km.fmt(v.get('median_km')))}</td></tr>"
                       for k, v in (sel.get("thresholds") or {}).items())
        out.append(f"<h2 style=\"margin-top:14px\">Selective prediction ({e(str(sel.get('split')))})</h2><table>{head}{body}</table>")
    if ood:
        out.append(para("**Out-of"))
    out.append("</section>")
    return "".join(out)


def _md_plain(s: str) -> str:
    return s.replace("**", "").replace("`", "")


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _area(v: Any) -> str:
    return "–" if v is None else f"{v:,.0f} km²"


def metrics_html(columns: dict[str, dict]) -> str:
    """HTML table, one row per metric, one column per predictor; the best value per row in bold."""
    e = html.escape
    out = ["<table><tr><th>metric</th>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>"]
    for m in table_metrics():
        vals = [c.get(m.name) for c in columns.values()]
        if all(v is None for v in vals):
            continue
        finite = [v for v in vals if isinstance(v, (int, float)) and np.isfinite(v)]
        best = (min(finite) if m.direction == "lower" else max(finite)) if len(set(finite)) > 1 else None
        cells = "".join(f'<td class="best">{e(m.fmt(v))}</td>' if best is not None and v == best else f"<td>{e(m.fmt(v))}</td>"
                        for v in vals)
        out.append(f'<tr><td title="{e(m.description)}">{e(m.label)}</td>{cells}</tr>')
    out.append("</table>")
    return "".join(out)


def kv_table(rows: dict[str, Any]) -> str:
    e = html.escape
    body = "".join(f"<tr><td>{e(str(k))}</td><td>{e('–' if v is None else str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


def epochs_table(metrics_csv: Path, max_rows: int = 12) -> str:
    """The last epochs of metrics.csv (a compact view; the full file is linked)."""
    if not metrics_csv.exists():
        return ""
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return ""
    e = html.escape
    cols = [c for c in ("epoch", "phase", "train_loss", "val_loss", "val_top1", "val_top5", "val_median_km", "lr", "seconds") if c in rows[0]]
    shown = rows[-max_rows:]
    head = "<tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{e(_short(r.get(c)))}</td>" for c in cols) + "</tr>" for r in shown)
    note = f"<p>Last {len(shown)} of {len(rows)} epochs; all in <a href=\"metrics.csv\">metrics.csv</a>.</p>"
    return f"<h2 style=\"margin-top:14px\">Epochs</h2><table>{head}{body}</table>{note}"


def png_data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _short(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    if f.is_integer() and abs(f) < 1e9:
        return str(int(f))
    return f"{f:.4g}"


def _gate_line(gate: dict) -> str:
    m = find(str(gate.get("metric", "")))
    f = (lambda v: m.fmt(v, unit=True)) if m else _num
    return f"{gate.get('metric')} = {f(gate.get('value'))} (previous {f(gate.get('previous'))}), promoted: {gate.get('promoted')}"


def _num(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:,.1f}{(' ' + unit) if unit else ''}"
    return str(v)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
