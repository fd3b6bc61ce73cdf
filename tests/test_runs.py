"""Run tracking: dashboards, the summary schema, cross-run ranking, the runs CLI, trackers."""
from __future__ import annotations

import base64
import datetime as dt
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import REPO, tiny_config

from geolocate.cli import app
from geolocate.runs.aggregate import WEIGHTS, aggregate, collect, compare, km_score, resolve_run, score_run
from geolocate.runs.artifacts import SCHEMA_VERSION
from geolocate.runs.dashboard import write_dashboard
from geolocate.runs.tracking import TrackerError, get_tracker, log_run_safely

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(trained, tmp_path_factory):
    """(runs_dir, [run_25_epochs, run_3_epochs]) in a private copy of the trained workspace."""
    from geolocate.runs.experiment import run_experiment

    cfg, run_dir, _ = trained
    dst = tmp_path_factory.mktemp("runs2") / "ws"
    shutil.copytree(Path(cfg.paths.data_dir).parent, dst, symlinks=True)
    first = dst / "runs" / run_dir.name
    second = run_experiment(tiny_config(dst, **{"train.epochs": 3}))
    for d in (first, second):
        write_dashboard(d)   # idempotent when run_experiment already wrote it
    return dst / "runs", [first, second]


def _copy_runs(runs: list[Path], dst: Path) -> list[Path]:
    """Copies of run folders under dst."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for r in runs:
        shutil.copytree(r, dst / r.name)
        out.append(dst / r.name)
    return out


def _edit_summary(run: Path, fn) -> None:
    p = run / "summary.json"
    s = json.loads(p.read_text())
    fn(s)
    p.write_text(json.dumps(s))


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.scripts_src: list[str] = []
        self.stylesheets: list[str] = []
        self.rows = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag == "tr":
            self.rows += 1
        if tag == "script" and a.get("src"):
            self.scripts_src.append(a["src"])
        if tag == "link":
            self.stylesheets.append(a.get("href") or "")
        for k in ("src", "href"):
            if a.get(k):
                self.urls.append(a[k])


def _parse(path: Path) -> _Page:
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().lower().startswith("<!doctype html>")
    page = _Page()
    page.feed(text)
    page.close()
    assert {"html", "head", "body", "title", "style"} <= set(page.tags)
    assert not page.scripts_src and not page.stylesheets, "external JS/CSS"
    assert not [u for u in page.urls if re.match(r"^(https?:)?//", u, re.I)], "remote URL in src/href"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    return page


# ---- dashboards ---------------------------------------------------------------------------
def test_run_dashboards_are_self_contained(two_runs):
    _, runs = two_runs
    for run in runs:
        html_path = run / "dashboard.html"
        assert html_path.is_file() and (run / "plots" / "error_map.png").read_bytes().startswith(PNG_MAGIC)
        page = _parse(html_path)
        data = [s for s in page.imgs if s.startswith("data:image/png;base64,")]
        assert len(page.imgs) == len(data) == 5  # loss, val accuracy, CDF, confusion, error map
        for s in data:
            assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG_MAGIC)
        text = html_path.read_text()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["run_id"] in text and summary["dataset"]["fingerprint"] in text
        assert "kNN" in text and "prior" in text
        rel = [u for u in page.urls if not u.startswith(("data:", "#"))]
        assert "config.json" in rel and "plots/error_map.png" in rel
        for u in rel:  # relative links resolve inside the runs folder
            assert not u.startswith("/") and ((run / u).exists() or u.startswith("../_aggregate/")), u


def test_dashboard_without_predictions_still_renders(two_runs, tmp_path):
    _, runs = two_runs
    (run,) = _copy_runs(runs[:1], tmp_path)
    (run / "predictions_test.parquet").unlink()
    (run / "plots" / "error_map.png").unlink()
    page = _parse(write_dashboard(run))
    assert len([s for s in page.imgs if s.startswith("data:image/png;base64,")]) == 4
    assert "predictions_test.parquet (missing)" in (run / "dashboard.html").read_text()


# ---- the summary schema (docs/summary_schema.md is the source of truth) ---------------------
TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "null": type(None), "array": list}


def _documented() -> dict[str, tuple[type, ...]]:
    text = (REPO / "docs" / "summary_schema.md").read_text(encoding="utf-8")
    keys: dict[str, tuple[type, ...]] = {}
    section = text.split("## Keys", 1)[1].split("## Metric table", 1)[0]
    for key, typ in re.findall(r"^\| `([^`]+)` \| ([^|]+(?:\\\|[^|]+)*) \|", section, re.M):
        keys[key] = tuple(t for name in re.split(r"\s*\\?\|\s*", typ.strip()) for t in [TYPES[name.strip()]])
    metrics = text.split("## Metric table", 1)[1]
    keys["__metrics__"] = tuple(re.findall(r"^\| `([^`]+)` \|", metrics, re.M))
    return keys


def _match(path: tuple[str, ...], patterns) -> str | None:
    for pat in patterns:
        pp = pat.split(".")
        if len(pp) == len(path) and all(p.startswith("<") or p == q for p, q in zip(pp, path)):
            return pat
    return None


def _walk(d, prefix=()):
    """(key path as a tuple, value) for every key; tuples because artifact names contain dots."""
    for k, v in d.items():
        key = (*prefix, k)
        yield key, v
        if isinstance(v, dict):
            yield from _walk(v, key)


def test_summary_schema_matches_docs(trained):
    _, run_dir, _ = trained
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["schema_version"] == SCHEMA_VERSION and isinstance(s["schema_version"], int)
    doc = _documented()
    metric_names = set(doc.pop("__metrics__"))
    assert {"top1_acc", "median_km", "p90_km", "geoscore", "n"} <= metric_names
    seen = set()
    for key, value in _walk(s):
        pat = _match(key, doc)
        assert pat is not None, f"summary key {key!r} is not documented in docs/summary_schema.md"
        ok = isinstance(value, doc[pat]) and not (isinstance(value, bool) and bool not in doc[pat])  # bool is an int
        assert ok, f"{key}: {type(value).__name__} is not {doc[pat]}"
        if pat.endswith("<metric>"):
            assert key[-1] in metric_names, key
        seen.add(pat)
    required = {k for k in doc if "<" not in k}
    assert required <= seen, f"documented but missing: {sorted(required - seen)}"
    for split in ("val", "test"):
        assert set(s["metrics"][split]) == metric_names
        for b in ("prior", "knn"):
            assert set(s["baselines"][b][split]) == metric_names
    dt.datetime.fromisoformat(s["created_at"])
    assert all(isinstance(v, bool) for v in s["artifacts"].values())


# ---- ranking ------------------------------------------------------------------------------
def test_score_is_monotonic_in_each_criterion():
    base = dict(val_top1_acc=0.4, val_p90_km=3000.0, val_median_km=800.0, missing_artifacts=0)
    s0 = score_run(**base)
    assert score_run(**base | {"val_top1_acc": 0.5}) > s0
    assert score_run(**base | {"val_p90_km": 2000.0}) > s0
    assert score_run(**base | {"val_median_km": 500.0}) > s0
    assert score_run(**base | {"missing_artifacts": 1}) == pytest.approx(s0 - WEIGHTS["missing_artifact"])
    assert score_run(**base | {"val_p90_km": None}) < s0   # a missing metric counts as its worst value
    assert km_score(0) == 1.0 and km_score(20015.0) == pytest.approx(0.0) and km_score(None) == 0.0
    assert km_score(100) > km_score(1000) > km_score(10000)
    assert sum(v for k, v in WEIGHTS.items() if k != "missing_artifact") == pytest.approx(1.0)


def test_aggregate_ranks_runs_and_writes_outputs(two_runs):
    runs_dir, runs = two_runs
    res = aggregate(runs_dir)
    t = res.table
    assert t.height == 2 and res.warnings == [] and not res.mixed   # `latest` link not counted twice
    assert t["rank"].to_list() == [1, 2] and t["dataset_group"].to_list() == ["D1", "D1"]
    assert t["score"][0] >= t["score"][1]
    assert set(t["run_id"]) == {r.name for r in runs}
    for r in t.iter_rows(named=True):
        assert r["score"] == pytest.approx(score_run(r["val_top1_acc"], r["val_p90_km"], r["val_median_km"], r["missing_artifacts"]), abs=1e-6)
        assert r["missing_artifacts"] == 0
    out = runs_dir / "_aggregate"
    assert pl.read_parquet(out / "runs_summary.parquet")["run_id"].to_list() == t["run_id"].to_list()
    assert pl.read_csv(out / "runs_summary.csv")["rank"].to_list() == [1, 2]
    page = _parse(out / "dashboard.html")
    text = (out / "dashboard.html").read_text()
    assert page.tags.count("script") == 1 and "sortable" in text and "Mixed datasets" not in text
    for k, w in WEIGHTS.items():
        assert f"{w:.2f}" in text, k
    for r in runs:
        assert f'href="../{r.name}/dashboard.html"' in text
    # aggregating again (with _aggregate present) gives the same table
    assert aggregate(runs_dir).table["run_id"].to_list() == t["run_id"].to_list()


def test_ranking_follows_the_criteria(two_runs, tmp_path):
    _, runs = two_runs
    a, b = _copy_runs(runs, tmp_path / "runs")

    def metrics(acc, p90, med):
        def fn(s):
            s["metrics"]["val"].update(top1_acc=acc, p90_km=p90, median_km=med)
        return fn

    _edit_summary(a, metrics(0.30, 4000.0, 900.0))
    _edit_summary(b, metrics(0.50, 4000.0, 900.0))
    assert collect(tmp_path / "runs").table["run_id"].to_list() == [b.name, a.name]
    _edit_summary(b, metrics(0.30, 5000.0, 900.0))           # worse p90 only
    assert collect(tmp_path / "runs").table["run_id"].to_list() == [a.name, b.name]
    _edit_summary(b, metrics(0.30, 4000.0, 700.0))           # better median only
    assert collect(tmp_path / "runs").table["run_id"].to_list() == [b.name, a.name]
    (b / "plots" / "loss.png").unlink()                      # a missing artifact costs 0.05
    t = collect(tmp_path / "runs").table
    row = t.filter(pl.col("run_id") == b.name).row(0, named=True)
    assert row["missing_artifacts"] == 1 and "plots/loss.png" in row["missing_list"]
    assert t["run_id"].to_list() == [a.name, b.name]


def test_different_datasets_are_ranked_apart_with_a_warning(two_runs, tmp_path):
    _, runs = two_runs
    a, b = _copy_runs(runs, tmp_path / "runs")
    _edit_summary(b, lambda s: s["dataset"].update(fingerprint="feedfacefeedface"))
    res = aggregate(tmp_path / "runs")
    t = res.table
    assert res.mixed and t["mixed_datasets"].all()
    assert sorted(t["dataset_group"].to_list()) == ["D1", "D2"] and t["rank"].to_list() == [1, 1]
    assert len(res.warnings) == 1 and "different datasets" in res.warnings[0] and "feedfacefeedface" in res.warnings[0]
    text = (tmp_path / "runs" / "_aggregate" / "dashboard.html").read_text()
    assert "Mixed datasets" in text and "feedface" in text
    r = CliRunner().invoke(app, ["runs", "aggregate", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "different datasets" in r.output
    cmp = compare(a, b)
    assert cmp["same_dataset"] is False


def test_malformed_summary_is_one_warning(two_runs, tmp_path):
    _, runs = two_runs
    _copy_runs(runs, tmp_path / "runs")
    bad = tmp_path / "runs" / "20990101-000000_broken"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    empty = tmp_path / "runs" / "20990101-000001_unfinished"
    empty.mkdir()
    res = aggregate(tmp_path / "runs")
    assert res.table.height == 2
    assert len(res.warnings) == 2 and any(str(bad / "summary.json") in w for w in res.warnings)
    r = CliRunner().invoke(app, ["runs", "list", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "20990101-000000_broken" in r.output


# ---- CLI: list, compare ---------------------------------------------------------------------
def test_cli_list_and_compare(two_runs):
    runs_dir, runs = two_runs
    r = CliRunner().invoke(app, ["runs", "list", "--runs-dir", str(runs_dir), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {x["run_id"] for x in rows} == {p.name for p in runs}
    r = CliRunner().invoke(app, ["runs", "compare", runs[0].name, "latest", "--runs-dir", str(runs_dir)])
    assert r.exit_code == 0, r.output
    assert "train.epochs" in r.output and "median_km" in r.output and "B − A" in r.output
    cmp = compare(runs[0], runs[1])
    assert cmp["same_dataset"] and {"key": "train.epochs", "a": 25, "b": 3} in cmp["config_diff"]
    med = next(m for m in cmp["metrics"] if m["predictor"] == "model" and m["split"] == "val" and m["metric"] == "median_km")
    assert med["delta"] == pytest.approx(med["b"] - med["a"])
    assert resolve_run(runs[1].name.split("_")[0], runs_dir).resolve() == runs[1].resolve()   # unique prefix
    assert resolve_run("latest", runs_dir).resolve() == runs[1].resolve()
    r = CliRunner().invoke(app, ["runs", "compare", "nope", "latest", "--runs-dir", str(runs_dir)])
    assert r.exit_code == 2 and "no run 'nope'" in r.output


# ---- trackers ---------------------------------------------------------------------------------
def test_tracker_registry(two_runs, monkeypatch):
    _, runs = two_runs
    assert get_tracker("none").log_run(runs[0]) is None

    class Broken:
        name = "broken"

        def log_run(self, run_dir):
            raise ConnectionError("tracking server gone")

    assert log_run_safely(Broken(), runs[0]) is None   # a tracker failure never fails a finished run
    monkeypatch.delenv("GEOLOCATE_TRACKER", raising=False)
    assert get_tracker().name == "none"
    with pytest.raises(ValueError, match="unknown tracker"):
        get_tracker("wandb")
    monkeypatch.setitem(sys.modules, "mlflow", None)   # as if mlflow were not installed
    with pytest.raises(TrackerError) as e:
        get_tracker("mlflow")
    assert isinstance(e.value, ImportError) and "\n" not in str(e.value) and "pip install" in str(e.value)
    r = CliRunner().invoke(app, ["runs", "track", str(runs[0]), "--tracker", "mlflow"])
    assert r.exit_code == 2 and "mlflow" in r.output


def test_mlflow_tracker_logs_a_run(two_runs, tmp_path):
    pytest.importorskip("mlflow")
    _, runs = two_runs
    tr = get_tracker("mlflow", uri=(tmp_path / "mlruns").as_uri(), experiment="t")
    rid = tr.log_run(runs[0])
    run = tr.client.get_run(rid)
    assert run.data.params["train.epochs"] == "25"
    assert run.data.metrics["test.median_km"] > 0
    assert run.data.tags["geolocate.run_id"] == runs[0].name


def test_a_new_dashboard_does_not_list_itself_as_missing(two_runs, tmp_path):
    _, runs = two_runs
    (run,) = _copy_runs(runs[:1], tmp_path)
    (run / "dashboard.html").unlink()  # as on a run's first write
    text = write_dashboard(run).read_text()
    assert "dashboard.html (missing)" not in text and '<a href="dashboard.html">dashboard.html</a>' in text


def test_runs_list_at_80_columns_shows_whole_values(two_runs, monkeypatch):
    from geolocate.cli import common
    from geolocate.runs.aggregate import _cell

    runs_dir, runs = two_runs
    monkeypatch.setattr(common.out_console, "_width", 80)
    r = CliRunner().invoke(app, ["runs", "list", "--runs-dir", str(runs_dir)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    table = collect(runs_dir).table
    for row in table.iter_rows(named=True):  # the key numbers of every run are there, whole
        for col, kind in (("score", "f3"), ("test_median_km", "median_km"), ("val_median_km", "median_km"),
                          ("test_top1_acc", "top1_acc")):
            assert any(f" {_cell(row[col], kind)} " in line for line in lines), (col, r.stdout)
    assert "columns hidden at 80 columns" in r.stdout and "--json" in r.stdout
