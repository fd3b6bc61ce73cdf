"""The metric catalogue: every metric's name, label, unit, direction, format and meaning, in one place.

A leaf module (it imports nothing of the project), so every layer may use it: the training loop's early
stopping, evaluation's promotion gate, the reports, dashboards, the cross-run ranking and the CLI tables.
``docs/summary_schema.md`` ("Metric table") documents the metrics of ``summary.json``; a test keeps the two
in agreement.

    >>> metric("median_km").fmt(1234.5, unit=True)
    '1,234 km'
    >>> better("top1_acc", 0.5, 0.4), direction("val/median_km")
    (True, 'lower')
"""
from __future__ import annotations

import dataclasses as dc
import math
from typing import Literal

Direction = Literal["lower", "higher"]
Unit = Literal["share", "km", "points", "count", "nats", "score"]

THRESHOLDS_KM = (1, 25, 200, 750, 2500)  # accuracy within r km counts d <= r
_SCALES = ("street", "city", "region", "country", "continent")  # what each threshold stands for
_SUFFIX = {"km": " km"}


def format_value(v: float | int | None, unit: Unit) -> str:
    """One value in a unit's display format: ``16.4%``, ``1,234`` / ``12.5`` km, ``1,390.2`` points; ``–`` when missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if unit == "share":
        return f"{100 * v:.1f}%"
    if unit == "count":
        return f"{int(v):,d}"
    if unit in ("nats", "score"):
        return f"{v:.3f}"
    return f"{v:,.0f}" if unit == "km" and abs(v) >= 100 else f"{v:,.1f}"


def format_delta(d: float | None, unit: Unit) -> str:
    """A difference between two values: ``+1.2 pt`` for shares, ``-12.5`` otherwise."""
    if d is None or not math.isfinite(d):
        return "–"
    return f"{100 * d:+.1f} pt" if unit == "share" else f"{d:+,.1f}"


@dc.dataclass(frozen=True)
class Metric:
    name: str                    # key in summary.json metric tables (``metrics.<split>.<name>``)
    label: str                   # table row label
    unit: Unit
    direction: Direction | None  # which way is better; None for counts that are not compared
    description: str             # the meaning, as in docs/summary_schema.md
    short: str = ""              # column heading where space is tight (``geolocate runs list``); the label if empty
    in_summary: bool = True      # False: a training-loop signal only, not in summary.json's metric tables

    def fmt(self, v: float | int | None, unit: bool = False) -> str:
        """``v`` formatted for display; ``unit=True`` appends the unit where the label does not carry it (`` km``)."""
        s = format_value(v, self.unit)
        return s + _SUFFIX.get(self.unit, "") if unit and s != "–" else s

    def fmt_delta(self, d: float | None) -> str:
        return format_delta(d, self.unit)

    @property
    def heading(self) -> str:
        return self.short or self.label

    def better(self, new: float, old: float, tol: float = 0.0) -> bool:
        """Whether ``new`` is strictly better than ``old`` (by more than ``tol``)."""
        if self.direction is None:
            raise ValueError(f"metric {self.name!r} has no direction: values are not compared")
        return new < old - tol if self.direction == "lower" else new > old + tol


def _share(name: str, label: str, description: str, short: str = "") -> Metric:
    return Metric(name, label, "share", "higher", description, short)


def _km(name: str, label: str, description: str, short: str = "") -> Metric:
    return Metric(name, label, "km", "lower", description, short)


CATALOGUE: dict[str, Metric] = {m.name: m for m in [
    Metric("n", "images", "count", None, "Images evaluated."),
    _share("top1_acc", "top-1 acc", "Share whose true cell is the top prediction.", short="top1"),
    _share("top5_acc", "top-5 acc", "Share whose true cell is among the top 5.", short="top5"),
    _km("median_km", "median km", "Median error in km.", short="med km"),
    _km("mean_km", "mean km", "Mean error in km."),
    _km("p90_km", "p90 km", "90th percentile error in km."),
    _km("p95_km", "p95 km", "95th percentile error in km."),
    *(_share(f"acc_{r}km", f"≤{r} km", f"Share with error ≤ {r} km ({scale}).") for r, scale in zip(THRESHOLDS_KM, _SCALES)),
    Metric("geoscore", "GeoScore", "points", "higher", "Mean of 5000 · exp(−d / 1492.7 km) (GeoGuessr-style, 0..5000)."),
    _share("country_acc", "country acc", "Share whose predicted point lies in the true country (nearest GeoNames place); "
           "null when undefined."),
    Metric("region_wtop5", "region weighted top-5", "score", "higher",
           "Weighted top-5 region score (0..1): 1, 0.6, 0.4, 0.25, 0.15 when the true location's region (country + "
           "GeoNames admin1) is the 1st..5th region answer (class probabilities summed per region), else 0.",
           short="region w5"),
    Metric("competition", "competition score", "score", "higher",
           "0.7 × region weighted top-5 + 0.3 × max(0, 1 − d / 5000 km), averaged over images (0..1).", short="comp"),
    Metric("loss", "loss", "nats", "lower", "The training loss on the validation split (the loop's ``val_loss``).",
           in_summary=False),
]}


def metric(name: str) -> Metric:
    """The catalogue entry of ``name``, which may name its split (``val/median_km``)."""
    key = name.rsplit("/", 1)[-1]
    if key not in CATALOGUE:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(CATALOGUE)}")
    return CATALOGUE[key]


def find(name: str) -> Metric | None:
    """The catalogue entry of ``name``, or None for a key the catalogue does not know (e.g. an older summary's)."""
    return CATALOGUE.get(name.rsplit("/", 1)[-1])


def direction(name: str) -> Direction | None:
    return metric(name).direction


def better(name: str, new: float, old: float, tol: float = 0.0) -> bool:
    """Whether ``new`` is strictly better than ``old`` for metric ``name``."""
    return metric(name).better(new, old, tol)


def table_metrics() -> list[Metric]:
    """The rows of a metric table (REPORT.md, dashboards, CLI), in display order: summary metrics with a direction."""
    return [m for m in CATALOGUE.values() if m.in_summary and m.direction is not None]


def gate_metrics() -> list[str]:
    """Names ``eval.gate_metric`` may take: the summary metrics that can be compared."""
    return sorted(m.name for m in table_metrics())


_PREDICTORS = {"knn": "kNN", "prior": "prior"}  # column prefix of a baseline's metrics -> its name in headings


def metric_column(col: str, short: bool = False) -> tuple[str, str, str]:
    """(column, heading, kind) of a flattened metric column (``[knn_|prior_]<split>_<metric>``, as in
    ``runs_summary.csv``): the heading comes from the catalogue (``short``: the short one) and the kind, the
    metric's name, picks its format."""
    who, rest = col.split("_", 1) if col.split("_", 1)[0] in _PREDICTORS else ("", col)
    split, name = rest.split("_", 1)
    m = metric(name)
    return col, " ".join(p for p in (_PREDICTORS.get(who, ""), split, m.heading if short else m.label) if p), m.name
