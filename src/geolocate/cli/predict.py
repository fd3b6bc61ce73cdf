"""The predict command (also ``python -m geolocate.predict``)."""
from __future__ import annotations

import contextlib
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..progress import tagged
from .common import err_console, fail, out_console

# exit codes of `predict` (also listed in its --help)
EXIT_OK, EXIT_NONE_PREDICTED, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3


class Engine(str, Enum):
    """Inference engines of :class:`geolocate.serving.Geolocator`."""
    auto = "auto"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"
    torch = "torch"


ENGINE_HELP = ("auto (default): ONNX Runtime from <model>.onnx, exported on first use and whenever the model changes, "
               "PyTorch if the export fails its parity check; onnx: ONNX Runtime or fail; onnx-int8: the int8 export "
               "made by `geolocate export-onnx-int8` (~2x faster, gated on agreement with fp32); torch: PyTorch eager")


def expand_inputs(inputs: list[Path]) -> list[Path]:
    from ..io import is_image_path

    out: list[Path] = []
    for p in inputs:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and is_image_path(q)))
        else:
            out.append(p)
    return out


def predict_paths(model: Path, paths: list, top_k: int = 5, json_out: bool = False, truths=None, batch_size: int = 32,
                  engine: str = "auto", min_confidence: float | None = None, csv_path: Path | None = None,
                  force: bool = False) -> tuple[int, int]:
    """Print predictions (none per image with ``csv_path`` unless ``json_out``: the CSV is the answer); return
    (ok, failed) counts."""
    from rich.table import Table
    from rich.text import Text

    from ..progress import progress_bar
    from ..serving import Geolocator
    from ..serving.confidence import apply_min_confidence, set_sentence
    from ..serving.submission import SubmissionError, submission_row, write_submission

    if csv_path is not None and csv_path.exists() and not force:
        fail(f"{csv_path} exists: give --force to overwrite it")
    rows: list[dict] = []

    try:
        geo = Geolocator.from_pretrained(model, engine=getattr(engine, "value", engine))
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    ok = bad = 0
    with progress_bar("predict", len(paths)) if len(paths) > 1 else contextlib.nullcontext(lambda *a, **k: None) as advance:
        for path, p in zip(paths, geo.predict_iter(paths, top_k=top_k, batch_size=batch_size, truths=truths)):
            advance()
            apply_min_confidence(p, min_confidence)
            if csv_path is not None:
                rows.append(submission_row(Path(path).stem, p))
            if p.error:
                bad += 1
                err_console.print(tagged("error", p.error, "red"), highlight=False, soft_wrap=True)
                if json_out:
                    print(json.dumps(p.to_dict()))
                continue
            ok += 1
            if json_out:
                print(json.dumps(p.to_dict()))
                continue
            if csv_path is not None:
                continue
            if p.warning:
                err_console.print(tagged("warning", f"{p.source}: {p.warning}"), highlight=False, soft_wrap=True)
            if p.abstained:
                out_console.print(f"{p.source}: abstained: confidence {100 * p.confidence:.1f}% is below --min-confidence "
                                  f"{100 * min_confidence:.1f}%", markup=False, highlight=False, soft_wrap=True)
                continue
            t = Table(title=Text(p.source), title_justify="left")
            for col in ("#", "H3 cell", "place", "confidence", "lat", "lon"):
                t.add_column(col, justify="right" if col in ("#", "confidence", "lat", "lon") else "left")
            for i, c in enumerate(p.top, 1):
                t.add_row(str(i), c.cell, Text(c.place), f"{100 * c.probability:.1f}%", f"{c.lat:.4f}", f"{c.lon:.4f}")
            out_console.print(t)
            where = "refined inside the top cells" if p.point == "refined" else "top cell"
            line = f"prediction: {p.lat:.4f}, {p.lon:.4f} ({p.place}, {where}, confidence {100 * p.confidence:.1f}%)"
            if p.error_km is not None:
                line += f"; truth {p.true_lat:.4f}, {p.true_lon:.4f}: error {p.error_km:,.1f} km"
            out_console.print(line, markup=False)
            if p.regions:
                out_console.print("regions: " + " · ".join(f"{r.region} {100 * r.probability:.1f}%" for r in p.regions),
                                  markup=False, highlight=False, soft_wrap=True)
            if p.prediction_set:
                out_console.print(f"{100 * p.prediction_set['coverage']:g}% set: {set_sentence(p.prediction_set)}", markup=False,
                                  highlight=False, soft_wrap=True)
    if len(paths) > 1 or bad:
        err_console.print(f"{ok} predicted, {bad} failed")
    if csv_path is not None:
        if bad:
            fail(f"{bad} of {len(paths)} images could not be predicted; {csv_path} needs one answer per image: not written")
        try:
            write_submission(csv_path, rows, len(paths), force=force)
        except SubmissionError as e:
            fail(str(e))
        err_console.print(f"wrote {csv_path} ({len(rows)} rows: id, region_1..region_5, lat, lon)", markup=False, highlight=False,
                          soft_wrap=True)
    return ok, bad


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_command(
        inputs: Annotated[list[Path], typer.Argument(help="image files and/or folders")],
        model: Annotated[Path, typer.Option("--model", "-m", help="model file")] = Path("models/best.pt"),
        top_k: Annotated[int, typer.Option("--top-k", "-k", min=1)] = 5,
        true_lat: Annotated[Optional[float], typer.Option("--true-lat", help="known latitude (single image)")] = None,
        true_lon: Annotated[Optional[float], typer.Option("--true-lon", help="known longitude (single image)")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="one JSON object per image")] = False,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
        engine: Annotated[Engine, typer.Option("--engine", case_sensitive=False, help=ENGINE_HELP)] = Engine.auto,
        min_confidence: Annotated[Optional[float], typer.Option(
            "--min-confidence", min=0.0, max=1.0,
            help="abstain below this top-1 confidence (0..1, calibrated): said on screen, `abstained: true` in --json; "
                 "the exit status does not change")] = None,
        csv_out: Annotated[Optional[Path], typer.Option(
            "--csv", help="write id,region_1..region_5,lat,lon (one row per image, checked before it is written)")] = None,
        force: Annotated[bool, typer.Option("--force", help="overwrite an existing --csv file")] = False,
    ):
        """Top-k H3 cells with place names, predicted lat/lon, confidence, km error when the truth is known.

        Exit status: 0 every image predicted; 3 some failed (each named on stderr, the rest predicted); 1 none predicted; 2 bad usage or model file.
        """
        paths = expand_inputs(inputs)
        if not paths:
            fail("no images found in the given inputs")
        truths = None
        if (true_lat is None) != (true_lon is None):
            fail("give both --true-lat and --true-lon")
        if true_lat is not None:
            if len(paths) != 1:
                fail(f"--true-lat/--true-lon describe one image, but {len(paths)} were given")
            if not (-90 <= true_lat <= 90 and -180 <= true_lon <= 180):
                fail(f"invalid --true-lat/--true-lon {true_lat}, {true_lon}")
            truths = [(true_lat, true_lon)] * len(paths)
        ok, bad = predict_paths(model, paths, top_k, json_out, truths, batch_size, engine.value, min_confidence, csv_out, force)
        if bad:
            raise typer.Exit(EXIT_NONE_PREDICTED if ok == 0 else EXIT_SOME_FAILED)


def main(argv: list[str] | None = None) -> None:
    """Entry for ``python -m geolocate.predict``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app(argv if argv is not None else sys.argv[1:])
