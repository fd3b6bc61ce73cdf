"""Training commands: train, evaluate, demo."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..progress import tagged
from .common import ConfigOpt, SetOpt, err_console, fail, load_config, out_console


def train_cmd(cfg, resume: Path | None = None, tracker: str | None = None) -> Path:
    """One run; under ``torchrun --nproc_per_node N -m geolocate.cli train`` every rank trains, rank 0 prints."""
    from ..runs.experiment import run_experiment
    from ..training import distributed as D

    try:
        run_dir = run_experiment(cfg, resume=resume, tracker=tracker)
        main = D.current().is_main
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    finally:
        D.shutdown()
    if main:
        print_summary(run_dir)
    return run_dir


def print_summary(run_dir: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    from ..catalogue import metric, table_metrics

    s = json.loads((run_dir / "summary.json").read_text())
    cols = {"model": s["metrics"]["test"], "prior": s["baselines"]["prior"]["test"], "kNN": s["baselines"]["knn"]["test"]}
    t = Table(title=Text(f"test split — run {s['run_id']}"))
    t.add_column("metric")
    for c in cols:
        t.add_column(c, justify="right")
    for m in table_metrics():
        t.add_row(m.label, *[m.fmt(c.get(m.name)) for c in cols.values()])
    out_console.print(t)
    g = s["gate"]
    gm = metric(g["metric"])
    out_console.print(f"run: {run_dir}  (REPORT.md, summary.json, metrics.csv, plots/)", markup=False)
    out_console.print(f"gate {g['split']} {g['metric']}={gm.fmt(g['value'], unit=True)}; previous best {gm.fmt(g['previous'], unit=True)}; "
                      + ("promoted to models/best.pt" if g["promoted"] else "models/best.pt kept"))


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(config: ConfigOpt = None, set_: SetOpt = None,
                      resume: Annotated[Optional[Path], typer.Option("--resume", help="continue runs/<id> from its last checkpoint")] = None,
                      tracker: Annotated[Optional[str], typer.Option("--tracker", help="none | mlflow (local ./mlruns)")] = None):
        """Train on the index's train split, evaluate on val/test with baselines, write runs/<id>/."""
        cfg = load_config(config, set_)
        if resume is not None and not (resume / "checkpoints" / "last.pt").exists():
            fail(f"cannot resume {resume}: no checkpoints/last.pt there")
        train_cmd(cfg, resume, tracker)

    @app.command("evaluate")
    def evaluate_command(
        model: Annotated[Path, typer.Option("--model", help="model file")] = Path("models/best.pt"),
        split: Annotated[str, typer.Option("--split", help="val | test")] = "test",
        config: ConfigOpt = None, set_: SetOpt = None,
        json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ):
        """Evaluate a model file on a split of the current index."""
        import numpy as np
        import polars as pl

        from ..evaluation import evaluate
        from ..index import load_index
        from ..progress import progress_bar
        from ..runs.artifacts import metrics_table
        from ..serving import Geolocator

        cfg = load_config(config, set_)
        try:
            geo = Geolocator.from_pretrained(model)
            df, labels, _ = load_index(cfg)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        if "split" not in df.columns:
            fail("no splits: run `geolocate split` first")
        part = df.filter(pl.col("split") == split)
        if part.height == 0:
            fail(f"split {split!r} is empty")
        cells = [c["cell"] for c in geo.classes]
        pos = {c: i for i, c in enumerate(cells)}
        scores, plat, plon, keep = [], [], [], []
        with progress_bar(f"evaluate ({split})", part.height) as advance:
            for i, p in enumerate(geo.predict_iter(part["path"].to_list(), top_k=len(cells), truths=list(zip(part["lat"], part["lon"])))):
                advance()
                if p.error:
                    err_console.print(tagged("skipped", p.error), highlight=False, soft_wrap=True)
                    continue
                row = np.zeros(len(cells))
                for c in p.top:
                    row[pos[c.cell]] = c.probability
                scores.append(row)
                plat.append(p.lat)
                plon.append(p.lon)
                keep.append(i)
        if not keep:
            fail(f"no image of split {split!r} could be read")
        if len(keep) < part.height:
            err_console.print(f"evaluated {len(keep)} of {part.height} images; {part.height - len(keep)} unreadable", markup=False)
        part = part[keep]
        y = np.array([pos.get(c, -1) for c in part["cell"].to_list()])
        m = evaluate(np.array(scores), y, part["lat"].to_numpy(), part["lon"].to_numpy(), np.array(plat), np.array(plon),
                     regions=geo.confidence.regions)
        if json_out:
            print(json.dumps(m, indent=2))
        else:
            out_console.print(metrics_table({f"{model} on {split}": m}), markup=False)

    @app.command("demo")
    def demo_command(config: ConfigOpt = None, set_: SetOpt = None):
        """Everything on the embedded Earth default: build, index, split, train, evaluate, predict."""
        from .data import build_dataset, build_index_cmd, split_cmd
        from .predict import predict_paths

        t0 = time.time()
        cfg = load_config(config, set_)
        cfg.source.name = "earth"
        cfg.index.sources = cfg.index.sources or ["earth"]   # the demo is the Earth data alone, whatever else is recorded
        build_dataset(cfg, "earth")
        build_index_cmd(cfg)
        split_cmd(cfg)
        run_dir = train_cmd(cfg)
        import polars as pl

        from ..index import load_index

        df, _, _ = load_index(cfg)
        sample = df.filter(pl.col("split") == "test").head(3)
        out_console.print("\n[bold]Predicting three test images[/] (truth from the index):")
        predict_paths(run_dir / "checkpoints" / "model.pt", sample["path"].to_list(), top_k=5,
                      truths=list(zip(sample["lat"].to_list(), sample["lon"].to_list())))
        out_console.print(f"\ndemo finished in {time.time() - t0:.0f} s. Look at {run_dir}/REPORT.md "
                          f"(and runs/latest); predict your own photo with `geolocate predict PHOTO.jpg`.", markup=False)
