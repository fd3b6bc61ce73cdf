"""Experiment trackers: a small registry, ``none`` (default) and ``mlflow``.

A tracker logs a *finished* run from the files in its folder (config.json,
summary.json, metrics.csv, the dashboard, REPORT.md, plots/), so tracking never
changes what a run writes and any old run can be logged later with
``geolocate runs track RUN --tracker mlflow``::

    tracker = get_tracker("mlflow")        # fails at once, in one line, if mlflow is missing
    ...train...
    tracker.log_run(run_dir)               # params, final + per-epoch metrics, artifacts

The mlflow backend imports ``mlflow`` lazily (install with
``pip install 'geo-locate-ml[mlflow]'``, which brings the light
``mlflow-skinny`` client; ``pip install mlflow`` adds the ``mlflow ui`` server
but pins pyarrow<26) and writes to a local file store, ``./mlruns`` unless
``MLFLOW_TRACKING_URI`` or ``uri=`` says otherwise (MLflow 3 keeps the file
store behind ``MLFLOW_ALLOW_FILE_STORE=true``, which this backend sets). Nothing leaves the machine. Add a backend with
:func:`register_tracker`.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol

TRACKERS: dict[str, Callable[..., "Tracker"]] = {}
ENV_VAR = "GEOLOCATE_TRACKER"


class TrackerError(ImportError):
    """A tracker that cannot be used here (its package is missing); the message is one line."""


class Tracker(Protocol):
    name: str

    def log_run(self, run_dir: str | Path) -> str | None:
        """Log a finished run; return the tracker's id for it (None if it keeps none)."""


def register_tracker(name: str) -> Callable[[Callable[..., Tracker]], Callable[..., Tracker]]:
    def deco(factory: Callable[..., Tracker]) -> Callable[..., Tracker]:
        TRACKERS[name] = factory
        return factory

    return deco


def get_tracker(name: str | None = None, **options: Any) -> Tracker:
    """The tracker called ``name`` (default: $GEOLOCATE_TRACKER, else ``none``), ready to use.

    Raises ValueError for an unknown name and :class:`TrackerError` (an
    ImportError) when the backend's package is not installed.
    """
    name = (name or os.environ.get(ENV_VAR) or "none").strip().lower()
    if name not in TRACKERS:
        raise ValueError(f"unknown tracker {name!r}: choose from {', '.join(sorted(TRACKERS))}")
    return TRACKERS[name](**options)


@register_tracker("none")
class NoTracker:
    """Logs nothing: the run folder itself is the record."""
    name = "none"

    def __init__(self, **_: Any):
        pass

    def log_run(self, run_dir: str | Path) -> str | None:
        return None


# ---- what a run holds, flattened for any tracker --------------------------------------
def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def run_record(run_dir: str | Path) -> dict:
    """params (flat config), metrics (flat final numbers), history (per-epoch rows), tags."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = summary.get("config") or {}
    params = {k: v for k, v in flatten(config).items()}
    metrics: dict[str, float] = {}
    for prefix, block in (("", summary.get("metrics") or {}), ("baseline.", summary.get("baselines") or {}),
                          ("training.", summary.get("training") or {})):
        for k, v in flatten(block).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                metrics[f"{prefix}{k}"] = float(v)
    if isinstance(summary.get("wall_time_s"), (int, float)):
        metrics["wall_time_s"] = float(summary["wall_time_s"])
    history = []
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as fh:
            history = list(csv.DictReader(fh))
    ds = summary.get("dataset") or {}
    tags = {"geolocate.run_id": str(summary.get("run_id", run_dir.name)), "geolocate.run_dir": str(run_dir.resolve()),
            "geolocate.dataset_fingerprint": str(ds.get("fingerprint")), "geolocate.status": str(summary.get("status")),
            "geolocate.schema_version": str(summary.get("schema_version"))}
    return {"run_id": tags["geolocate.run_id"], "params": params, "metrics": metrics, "history": history, "tags": tags}


ARTIFACTS = ["summary.json", "config.json", "metrics.csv", "REPORT.md", "dashboard.html", "plots"]


@register_tracker("mlflow")
class MlflowTracker:
    """MLflow, local file store by default; checkpoints are not uploaded unless ``log_models=True``."""
    name = "mlflow"

    def __init__(self, uri: str | None = None, experiment: str = "geolocate", log_models: bool = False, **_: Any):
        try:
            import mlflow  # noqa: F401
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackerError("--tracker mlflow needs mlflow, which is not installed: pip install mlflow-skinny "
                               "(the project's optional 'mlflow' extra), or use --tracker none") from None
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
        if self.uri.startswith("file:") or "://" not in self.uri:
            # MLflow 3.x keeps the local file store only behind this opt-in; a local folder is what we want
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.experiment = experiment
        self.log_models = log_models
        self.client = MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        return exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)

    def log_run(self, run_dir: str | Path) -> str | None:
        from mlflow.entities import Metric, Param, RunTag

        run_dir = Path(run_dir)
        rec = run_record(run_dir)
        run = self.client.create_run(self._experiment_id(), run_name=rec["run_id"], tags=rec["tags"])
        rid = run.info.run_id
        ts = int(run.info.start_time or 0)
        params = [Param(k[:250], "" if v is None else str(v)[:6000]) for k, v in rec["params"].items()]
        metrics = [Metric(_key(k), v, ts, 0) for k, v in rec["metrics"].items()]
        for row in rec["history"]:
            step = int(float(row.get("epoch") or 0))
            for k, v in row.items():
                try:
                    f = float(v)
                except (TypeError, ValueError):
                    continue
                if k != "epoch" and math.isfinite(f):
                    metrics.append(Metric(_key(f"epoch.{row.get('phase', 'train')}.{k}"), f, ts, step))
        for i in range(0, len(metrics), 900):  # log_batch takes <= 1000 entries, <= 100 of them params
            self.client.log_batch(rid, metrics=metrics[i:i + 900], params=[], tags=[])
        for i in range(0, len(params), 100):
            self.client.log_batch(rid, metrics=[], params=params[i:i + 100], tags=[])
        self.client.log_batch(rid, tags=[RunTag("mlflow.note.content", f"geolocate run {rec['run_id']}: open dashboard.html")])
        for name in ARTIFACTS + (["checkpoints"] if self.log_models else []):
            p = run_dir / name
            if p.is_dir():
                self.client.log_artifacts(rid, str(p), artifact_path=name)
            elif p.is_file():
                self.client.log_artifact(rid, str(p))
        self.client.set_terminated(rid, "FINISHED" if (json.loads((run_dir / "summary.json").read_text()).get("status") == "completed") else "FAILED")
        return rid


def _key(k: str) -> str:
    """MLflow metric names allow alphanumerics, _ - . / and space."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)[:250]


def log_run_safely(tracker: Tracker, run_dir: str | Path) -> str | None:
    """``tracker.log_run(run_dir)`` where a tracker failure is one warning line, never a failed run."""
    try:
        return tracker.log_run(run_dir)
    except Exception as e:  # noqa: BLE001 - the run itself is complete and on disk
        from ..io import one_line
        from ..progress import console, tagged

        console.print(tagged("warning", f"tracker {tracker.name!r} could not log {Path(run_dir).name}: "
                      f"{one_line(e)}"), highlight=False, soft_wrap=True)
        return None
