"""``geolocate runs``: list, aggregate, compare, dashboard and track finished runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.text import Text

from ..catalogue import find, format_delta, format_value, metric_column
from ..progress import tagged
from .common import ConfigOpt, SetOpt, err_console, fail, load_config, out_console

RunsDirOpt = Annotated[Optional[Path], typer.Option("--runs-dir", help="runs folder (default: paths.runs_dir of the config)")]


def _runs_dir(runs_dir: Path | None, config: Path | None, set_: list[str] | None) -> Path:
    return runs_dir if runs_dir is not None else Path(load_config(config, set_).paths.runs_dir)


def _warn(lines: list[str]) -> None:
    for w in lines:
        err_console.print(tagged("warning", w), highlight=False, soft_wrap=True)


def _fmt(v, kind: str) -> str:
    from ..runs.aggregate import _cell

    return _cell(v, kind)


# `runs list` columns in display order, and the order they are dropped in when the terminal is narrow (last first)
LIST_COLUMNS = [("dataset_group", "data", "s"), ("rank", "#", "i"), ("run_id", "run", "s"), ("score", "score", "f3"),
                *(metric_column(c, short=True) for c in ("val_top1_acc", "val_median_km", "val_p90_km", "test_top1_acc",
                                                         "test_median_km", "knn_test_median_km")),
                ("missing_artifacts", "miss", "i"), ("epochs_run", "ep", "i")]
LIST_PRIORITY = ["run_id", "score", "test_median_km", "val_median_km", "rank", "test_top1_acc", "val_top1_acc",
                 "dataset_group", "knn_test_median_km", "val_p90_km", "missing_artifacts", "epochs_run"]
_RUN_ID_MIN = 24  # a run id folds onto several lines down to this width


def _width(rows: list[dict], col: str) -> int:
    return max([len(r[col]) for r in rows] + [1])


def fit_columns(rows: list[dict], width: int) -> list[tuple[str, str, str]]:
    """The LIST_COLUMNS that fit ``width`` with every value whole (highest priority first; the run id may fold)."""
    need = {c: (min(_width(rows, c), _RUN_ID_MIN) if c == "run_id" else max(_width(rows, c), len(label))) + 3
            for c, label, _ in LIST_COLUMNS}  # cell padding and the border
    keep, used = set(), 1
    for c in LIST_PRIORITY:
        if used + need[c] <= width or not keep:
            keep.add(c)
            used += need[c]
    return [col for col in LIST_COLUMNS if col[0] in keep]


def register(app: typer.Typer) -> None:
    runs_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Finished runs: list, rank, compare, track.")
    app.add_typer(runs_app, name="runs")

    @runs_app.command("list")
    def list_command(runs_dir: RunsDirOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
                     json_out: Annotated[bool, typer.Option("--json", help="print the table as JSON rows")] = False):
        """Every run with its key validation/test numbers, score and rank within its dataset."""
        from rich.table import Table

        from ..runs.aggregate import collect

        root = _runs_dir(runs_dir, config, set_)
        res = collect(root)
        if json_out:
            print(json.dumps(res.table.to_dicts(), indent=2, default=str))
            _warn(res.warnings)
            return
        if res.table.height == 0:
            _warn(res.warnings)
            out_console.print(f"no runs with a summary.json under {root}", markup=False)
            return
        rows = [{c: _fmt(r[c], kind) for c, _, kind in LIST_COLUMNS} for r in res.table.iter_rows(named=True)]
        shown = fit_columns(rows, out_console.width)
        t = Table(title=Text(f"runs in {root}" + (" — MIXED DATASETS: ranks are per dataset" if res.mixed else "")))
        for c, label, kind in shown:
            t.add_column(label, justify="left" if kind == "s" else "right", no_wrap=c != "run_id", overflow="fold",
                         min_width=min(_width(rows, c), _RUN_ID_MIN) if c == "run_id" else None)
        for r in rows:
            t.add_row(*[Text(r[c]) for c, _, _ in shown])
        out_console.print(t)
        hidden = [label for c, label, _ in LIST_COLUMNS if (c, label, _) not in shown]
        if hidden:
            out_console.print(f"{len(hidden)} columns hidden at {out_console.width} columns ({', '.join(hidden)}): "
                              "widen the terminal or use --json", markup=False, highlight=False)
        _warn(res.warnings)

    @runs_app.command("aggregate")
    def aggregate_command(runs_dir: RunsDirOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
                          out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default RUNS/_aggregate)")] = None):
        """Rank all runs into RUNS/_aggregate/ (runs_summary.csv, .parquet, dashboard.html)."""
        from ..runs.aggregate import aggregate

        root = _runs_dir(runs_dir, config, set_)
        if not root.is_dir():
            fail(f"no runs folder at {root}: train a model first (`geolocate train`)")
        res = aggregate(root, out)
        _warn(res.warnings)
        best = res.table.filter(res.table["rank"] == 1) if res.table.height else res.table
        for r in best.iter_rows(named=True):
            out_console.print(f"best on dataset {r['dataset_group']} ({r['dataset_fingerprint']}): {r['run_id']} score {r['score']:.3f}", markup=False)
        out_console.print(f"{res.table.height} runs ranked -> {res.out_dir}/dashboard.html, runs_summary.csv, runs_summary.parquet", markup=False)

    @runs_app.command("compare")
    def compare_command(a: Annotated[str, typer.Argument(help="run A: id, id prefix, path or 'latest'")],
                        b: Annotated[str, typer.Argument(help="run B")],
                        runs_dir: RunsDirOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
                        split: Annotated[str, typer.Option("--split", help="val | test | all")] = "all",
                        baselines: Annotated[bool, typer.Option("--baselines", help="also the kNN and prior rows")] = False,
                        json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
        """Metric deltas (B − A) for model and baselines, and the config diff."""
        from rich.table import Table

        from ..runs.aggregate import compare, resolve_run

        root = _runs_dir(runs_dir, config, set_)
        try:
            ra, rb = resolve_run(a, root), resolve_run(b, root)
            cmp = compare(ra, rb)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        if json_out:
            print(json.dumps(cmp, indent=2, default=str))
            return
        if not cmp["same_dataset"]:
            _warn([f"A and B use different datasets ({cmp['fingerprints'][0]} vs {cmp['fingerprints'][1]}): deltas are not like for like"])
        t = Table(title=Text(f"A = {cmp['a']}\nB = {cmp['b']}"))
        for c in ("predictor", "split", "metric", "A", "B", "B − A", "better"):
            t.add_column(c, justify="left" if c in ("predictor", "split", "metric", "better") else "right")
        for r in cmp["metrics"]:
            if (split != "all" and r["split"] != split) or (r["predictor"] != "model" and not baselines):
                continue
            m = find(r["metric"])
            f = m.fmt if m else (lambda v: format_value(v, "points"))
            ds = m.fmt_delta(r["delta"]) if m else format_delta(r["delta"], "points")
            colour = {"a": "red", "b": "green"}.get(r["better"] or "", "")
            t.add_row(r["predictor"], r["split"], r["metric"], f(r["a"]), f(r["b"]),
                      f"[{colour}]{ds}[/]" if colour else ds, r["better"].upper() if r["better"] else "=")
        out_console.print(t)
        out_console.print(f"score A {cmp['score'][0]:.3f}  B {cmp['score'][1]:.3f}")
        if cmp["config_diff"]:
            ct = Table(title="config diff")
            for c in ("key", "A", "B"):
                ct.add_column(c)
            for r in cmp["config_diff"]:
                ct.add_row(Text(r["key"]), Text(str(r["a"])), Text(str(r["b"])))
            out_console.print(ct)
        else:
            out_console.print("configs are identical")

    @runs_app.command("dashboard")
    def dashboard_command(run: Annotated[str, typer.Argument(help="run id, id prefix, path or 'latest'")] = "latest",
                          runs_dir: RunsDirOpt = None, config: ConfigOpt = None, set_: SetOpt = None):
        """(Re)write RUN/dashboard.html and plots/error_map.png from the run's files."""
        from ..runs.aggregate import resolve_run
        from ..runs.dashboard import write_dashboard

        root = _runs_dir(runs_dir, config, set_)
        try:
            path = write_dashboard(resolve_run(run, root))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        out_console.print(f"dashboard: {path}", markup=False)

    @runs_app.command("track")
    def track_command(runs: Annotated[list[str], typer.Argument(help="run ids, prefixes, paths or 'latest'")],
                      tracker: Annotated[str, typer.Option("--tracker", help="none | mlflow")] = "mlflow",
                      uri: Annotated[Optional[str], typer.Option("--uri", help="tracking URI (default ./mlruns)")] = None,
                      experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment name")] = "geolocate",
                      runs_dir: RunsDirOpt = None, config: ConfigOpt = None, set_: SetOpt = None):
        """Log finished runs to an experiment tracker (MLflow: local file store ./mlruns)."""
        from ..runs.aggregate import resolve_run
        from ..runs.tracking import get_tracker

        root = _runs_dir(runs_dir, config, set_)
        try:
            tr = get_tracker(tracker, uri=uri, experiment=experiment)
            dirs = [resolve_run(r, root) for r in runs]
        except (ImportError, ValueError, FileNotFoundError) as e:
            fail(str(e))
        for d in dirs:
            rid = tr.log_run(d)
            out_console.print(f"{d.name}: logged to {tracker}" + (f" (run {rid}, {getattr(tr, 'uri', '')})" if rid else ""), markup=False)
