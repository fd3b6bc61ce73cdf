"""The metric catalogue: one entry per metric, agreeing with evaluation, the docs, the gate and the loop."""
import re
from pathlib import Path

import numpy as np
import pytest

from geolocate.catalogue import CATALOGUE, better, direction, find, gate_metrics, metric, metric_column, table_metrics
from geolocate.config import Config, ConfigError
from geolocate.evaluation import evaluate
from geolocate.evaluation.metrics import improves
from geolocate.evaluation.regions import RegionSpace
from geolocate.training.loop import MONITORS, VAL_ROW_METRICS, EarlyStopping

REPO = Path(__file__).resolve().parents[1]
DIRECTED = [m.name for m in CATALOGUE.values() if m.direction is not None]


def _documented_metrics() -> dict[str, str]:
    """docs/summary_schema.md, "Metric table": metric -> meaning."""
    text = (REPO / "docs" / "summary_schema.md").read_text(encoding="utf-8")
    table = text.split("## Metric table", 1)[1].split("\n## ", 1)[0]
    return {k: meaning.strip() for k, meaning in re.findall(r"^\| `([^`]+)` \| [^|]+(?:\\\|[^|]+)* \| (.+) \|$", table, re.M)}


def test_docs_metric_table_agrees_with_the_catalogue():
    doc = _documented_metrics()
    summary = {m.name: m.description for m in CATALOGUE.values() if m.in_summary}
    assert doc == summary


def test_every_evaluated_metric_is_catalogued():
    rng = np.random.default_rng(0)
    scores = rng.random((6, 8))
    lat, lon = rng.uniform(-60, 60, 6), rng.uniform(-170, 170, 6)
    regions = RegionSpace.from_points(rng.uniform(-60, 60, 8), rng.uniform(-170, 170, 8))
    out = evaluate(scores, rng.integers(0, 8, 6), lat, lon, lat + 1, lon + 1, regions=regions)
    assert set(out) == {m.name for m in CATALOGUE.values() if m.in_summary}
    assert not {"region_wtop5", "competition"} & set(evaluate(scores, rng.integers(0, 8, 6), lat, lon, lat, lon))


@pytest.mark.parametrize("name", DIRECTED)
def test_every_directed_metric_round_trips_through_the_gate(name):
    lo, hi = 0.25, 0.75
    good, bad = (lo, hi) if direction(name) == "lower" else (hi, lo)
    for key in (name, f"val/{name}"):
        assert improves(key, good, bad) and not improves(key, bad, good) and not improves(key, good, good)
        assert better(key, good, bad) == metric(key).better(good, bad)


def test_gate_metric_config_accepts_exactly_the_summary_metrics_with_a_direction():
    assert set(gate_metrics()) == {m.name for m in CATALOGUE.values() if m.in_summary and m.direction}
    for name in gate_metrics():
        assert Config.load(None, [f"eval.gate_metric={name}"]).eval.gate_metric == name
    for name in ("n", "loss"):  # a count, and a loop-only signal summary.json does not hold
        with pytest.raises(ConfigError, match="eval.gate_metric must be one of"):
            Config.load(None, [f"eval.gate_metric={name}"])


def test_loop_signals_are_catalogued_and_early_stopping_follows_their_direction():
    assert set(MONITORS) <= set(VAL_ROW_METRICS)
    for signal, name in VAL_ROW_METRICS.items():
        assert find(name) is not None and signal.startswith("val_"), signal
    for signal, name in MONITORS.items():
        stop = EarlyStopping(signal, patience=1)
        good, bad = (1.0, 2.0) if direction(name) == "lower" else (2.0, 1.0)
        assert stop.better(good, bad) and not stop.better(bad, good) and stop.better(bad, None)


def test_formats():
    assert metric("median_km").fmt(1234.5, unit=True) == "1,234 km" and metric("median_km").fmt(12.34) == "12.3"
    assert metric("top1_acc").fmt(0.164) == "16.4%" and metric("geoscore").fmt(1390.24) == "1,390.2"
    assert metric("n").fmt(1234) == "1,234" and metric("p90_km").fmt(None, unit=True) == "–"
    assert metric("p90_km").fmt(float("nan")) == "–"
    assert metric("acc_750km").fmt_delta(0.012) == "+1.2 pt" and metric("mean_km").fmt_delta(-12.25) == "-12.2"
    with pytest.raises(KeyError, match="unknown metric"):
        metric("median_kms")
    with pytest.raises(ValueError, match="no direction"):
        better("n", 2, 1)


def test_tables_and_columns_take_labels_from_the_catalogue():
    assert [m.name for m in table_metrics()][:3] == ["top1_acc", "top5_acc", "median_km"]
    assert metric_column("knn_test_median_km") == ("knn_test_median_km", "kNN test median km", "median_km")
    assert metric_column("val_top1_acc", short=True) == ("val_top1_acc", "val top1", "top1_acc")
