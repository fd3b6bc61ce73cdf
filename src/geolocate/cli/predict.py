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


def load_geolocator(model: Path | list[Path], engine: str = "auto", ensemble: str = "average", tta: bool = False):
    """The Geolocator of one model file, or the ensemble of several; a bad file or set is one error line (exit 2).
    ``tta``: each image is predicted from the test-time views its domain allows (``geolocate.tta``)."""
    from ..serving import Geolocator

    try:
        geo = Geolocator.from_pretrained(model, engine=getattr(engine, "value", engine), ensemble=ensemble)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    geo.tta = tta
    return geo


def _first_view(sample) -> Path:
    """The path that names a sample: itself, or the first view of a list or of a {view name: path} mapping."""
    if isinstance(sample, dict):
        sample = next(iter(sample.values()), "")
    if isinstance(sample, (list, tuple)):
        sample = sample[0] if sample else ""
    return Path(sample)


def predict_paths(model: Path | list[Path], paths: list, top_k: int = 5, json_out: bool = False, truths=None, batch_size: int = 32,
                  engine: str = "auto", min_confidence: float | None = None, csv_path: Path | None = None,
                  force: bool = False, ensemble: str = "average", tta: bool = False,
                  ids: list[str] | None = None) -> tuple[int, int]:
    """Print predictions (none per image with ``csv_path`` unless ``json_out``: the CSV is the answer); return
    (ok, failed) counts. An entry of ``paths`` that is a list (or a {view: path} mapping) is one multi-view sample.
    ``ids``: each entry's id in the CSV (a manifest's group ids); default the file name of its (first) view."""
    from rich.table import Table
    from rich.text import Text

    from ..progress import progress_bar
    from ..serving.confidence import apply_min_confidence, set_sentence
    from ..serving.submission import SubmissionError, check_unique_ids, submission_row, write_submission

    if csv_path is not None and csv_path.exists() and not force:
        fail(f"{csv_path} exists: give --force to overwrite it")
    firsts = [_first_view(p) for p in paths]
    ids = list(ids) if ids is not None else [f.stem for f in firsts]  # a multi-view sample's: its first view's
    if csv_path is not None:
        try:
            check_unique_ids(ids, [str(f) for f in firsts])
        except SubmissionError as e:
            fail(str(e))
    rows: list[dict] = []

    geo = load_geolocator(model, engine, ensemble, tta)
    ok = bad = abstained = 0
    with progress_bar("predict", len(paths)) if len(paths) > 1 else contextlib.nullcontext(lambda *a, **k: None) as advance:
        for sample_id, p in zip(ids, geo.predict_iter(paths, top_k=top_k, batch_size=batch_size, truths=truths)):
            advance()
            apply_min_confidence(p, min_confidence)
            if csv_path is not None:
                rows.append(submission_row(sample_id, p))
                abstained += bool(p.abstained)
            for d in p.dropped if not p.error else ():
                err_console.print(tagged("warning", f"{p.source}: view dropped: {d}"), highlight=False, soft_wrap=True)
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
            if p.views and (len(p.views) > 1 or p.dropped):
                line += f"; from {len(p.views)} of {len(p.views) + len(p.dropped)} views"
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
        if abstained:  # the answer file has no way to abstain: say how many of its answers the threshold would withhold
            err_console.print(tagged("note", f"{abstained} of {len(rows)} answers are below --min-confidence "
                                     f"{100 * min_confidence:.1f}%; they are in {csv_path} all the same (it needs one answer "
                                     "per image): --json marks each one \"abstained\""), highlight=False, soft_wrap=True)
    return ok, bad


def predict_sequences(model: Path | list[Path], sequences: list, top_k: int = 5, json_out: bool = False,
                      batch_size: int = 32, engine: str = "auto", ensemble: str = "average",
                      combiner: str = "sum_logprob", combiner_params: dict | None = None, tta: bool = False) -> tuple[int, int]:
    """Print one answer per sequence (its frames' evidence combined) and each frame's; return (frames ok, frames failed).

    ``sequences``: ``(id, [paths][, [truth or None per path]])`` tuples. JSON: one object per sequence (``prediction``, ``frames``, ``frame_errors_km``).
    """
    from rich.table import Table
    from rich.text import Text

    geo = load_geolocator(model, engine, ensemble, tta)
    ok = bad = 0
    for sp in geo.predict_sequences_iter(sequences, top_k=top_k, batch_size=batch_size, combiner=combiner,
                                         combiner_params=combiner_params):
        for f in sp.frames:
            if f.error:
                bad += 1
                err_console.print(tagged("error", f.error, "red"), highlight=False, soft_wrap=True)
            else:
                ok += 1
        if json_out:
            print(json.dumps(sp.to_dict()))
            continue
        s = sp.prediction
        t = Table(title=Text(f"sequence {sp.sequence}: {len(s.views)} frame(s)"), title_justify="left")
        # each frame's own answer, its error, and the error of the sequence's answer at that frame's position
        for col in ("frame", "place", "conf.", "lat", "lon", "err km", "seq. err km"):
            t.add_column(col, justify="left" if col in ("frame", "place") else "right")
        for f, e in zip(sp.frames, sp.frame_errors_km):
            if f.error:
                t.add_row(Text(f.source), Text("(not used)"), "", "", "", "", "")
                continue
            t.add_row(Text(Path(f.source).name), Text(f.place or ""), f"{100 * f.confidence:.1f}%", f"{f.lat:.4f}", f"{f.lon:.4f}",
                      "" if f.error_km is None else f"{f.error_km:,.1f}", "" if e is None else f"{e:,.1f}")
        out_console.print(t)
        if s.error:
            err_console.print(tagged("error", s.error, "red"), highlight=False, soft_wrap=True)
            continue
        where = "refined inside the top cells" if s.point == "refined" else "top cell"
        line = (f"sequence {sp.sequence}: {s.lat:.4f}, {s.lon:.4f} ({s.place}, {where}, confidence {100 * s.confidence:.1f}%, "
                f"{sp.combiner} over {len(s.views)} frame(s))")
        known = [e for e in sp.frame_errors_km if e is not None]
        if known:
            import statistics

            line += f"; median error over its {len(known)} known frame(s) {statistics.median(known):,.1f} km"
        out_console.print(line, markup=False)
    if ok + bad > 1 or bad:
        err_console.print(f"{ok} frames predicted, {bad} failed, in {len(sequences)} sequence(s)")
    return ok, bad


class EnsembleMethod(str, Enum):
    """How ``--model A --model B`` combine (geolocate.tasks.combine.ENSEMBLE_METHODS)."""
    average = "average"
    val_median = "val-median"
    val_loss = "val-loss"
    rank = "rank"


ENSEMBLE_HELP = ("how several --model files combine: average of probabilities (default); val-median / val-loss: "
                 "averages weighted by each model's validation median km (1/km) or loss (exp(-loss)); rank: reciprocal rank fusion")
# the sequence combiner's defaults (chosen on validation: docs/multiview.md, bench/bench_sequences.py)
SEQUENCE_COMBINER, SEQUENCE_TEMPERATURE, SEQUENCE_FLOOR = "sum_logprob", 1.0, 1e-4


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_command(
        inputs: Annotated[Optional[list[Path]], typer.Argument(help="image files and/or folders")] = None,
        model: Annotated[Optional[list[Path]], typer.Option("--model", "-m", help="model file; repeat for an ensemble "
                                                            "(same cells, same order) [default: models/best.pt]")] = None,
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
        views: Annotated[bool, typer.Option("--views", help="the inputs are views of one place (e.g. N E S W): one answer; "
                                            "a model trained with a fusion fuses them in its slot order (give them in that "
                                            "order), any other model averages their probabilities")] = False,
        manifest: Annotated[Optional[Path], typer.Option("--manifest", help="CSV/parquet with path and group (or sample_id) "
                                                         "columns, optional view and lat/lon: one answer per group; with "
                                                         "--sequence its sequence_id column groups frames")] = None,
        sequence: Annotated[bool, typer.Option("--sequence", help="group frames into sequences (folder + EXIF capture-time "
                                               "gaps, or the manifest's sequence_id) and answer once per sequence")] = False,
        sequence_gap: Annotated[float, typer.Option("--sequence-gap", min=0, help="seconds between frames that start a "
                                                    "new sequence")] = 60.0,
        sequence_temperature: Annotated[float, typer.Option("--sequence-temperature", min=1e-6, help="temperature of the "
                                                            "sum of frame log-probabilities")] = SEQUENCE_TEMPERATURE,
        ensemble: Annotated[EnsembleMethod, typer.Option("--ensemble", case_sensitive=False, help=ENSEMBLE_HELP)] = EnsembleMethod.average,
        tta: Annotated[bool, typer.Option("--tta", help="test-time augmentation: fuse the views the model's domain allows "
                                          "(aerial: crops that keep north up; street: crops and a small roll; never flips)")] = False,
    ):
        """Top-k H3 cells with place names, predicted lat/lon, confidence, km error when the truth is known.

        Exit status: 0 every image predicted; 3 some failed (each named on stderr, the rest predicted); 1 none predicted; 2 bad usage or model file.
        """
        models = list(model) if model else [Path("models/best.pt")]
        if manifest is not None and inputs:
            fail("give images/folders or --manifest, not both")
        if views and sequence:
            fail("--views makes one sample of the inputs; --sequence groups frames: use one of them")
        if (true_lat is None) != (true_lon is None):
            fail("give both --true-lat and --true-lon")
        if manifest is not None:
            from ..serving.grouping import SAMPLE_KEYS, SEQUENCE_KEYS, manifest_groups

            if views:
                fail("--views is for images on the command line; a manifest groups views by its group column")
            try:
                groups = manifest_groups(manifest, SEQUENCE_KEYS if sequence else SAMPLE_KEYS)
            except (FileNotFoundError, ValueError) as e:
                fail(str(e))
            if not groups:
                fail(f"manifest {manifest} has no rows")
            if true_lat is not None:
                fail("--true-lat/--true-lon describe one image; give a manifest's known positions in its lat/lon columns")
            if sequence:
                ok, bad = predict_sequences(models, [(g.id, g.paths, g.truths) for g in groups], top_k, json_out,
                                            batch_size, engine.value, ensemble.value, SEQUENCE_COMBINER,
                                            {"temperature": sequence_temperature, "floor": SEQUENCE_FLOOR}, tta=tta)
            else:
                # a group whose rows all name their view (and name each once) is a mapping: a fused model slots them by name
                samples = [dict(zip(g.views, g.paths)) if len(g.paths) > 1 and all(g.views) and len(set(g.views)) == len(g.views)
                           else g.paths if len(g.paths) > 1 else g.paths[0] for g in groups]
                truths = [g.truth for g in groups] if any(g.truth for g in groups) else None
                ok, bad = predict_paths(models, samples, top_k, json_out, truths, batch_size, engine.value, min_confidence, csv_out,
                                        force, ensemble.value, tta=tta, ids=[str(g.id) for g in groups])
            if bad:
                raise typer.Exit(EXIT_NONE_PREDICTED if ok == 0 else EXIT_SOME_FAILED)
            return
        paths = expand_inputs(inputs or [])
        if not paths:
            fail("no images found in the given inputs")
        if sequence:
            from ..serving.grouping import time_sequences

            if true_lat is not None:
                fail("--true-lat/--true-lon describe one image, not a sequence")
            groups, untimed = time_sequences(paths, sequence_gap)
            if untimed:
                err_console.print(tagged("warning", f"{len(untimed)} frame(s) have no EXIF capture time: each is a sequence "
                                                    "of its own"), highlight=False, soft_wrap=True)
            ok, bad = predict_sequences(models, [(g.id, g.paths) for g in groups], top_k, json_out, batch_size, engine.value,
                                        ensemble.value, SEQUENCE_COMBINER,
                                        {"temperature": sequence_temperature, "floor": SEQUENCE_FLOOR}, tta=tta)
            if bad:
                raise typer.Exit(EXIT_NONE_PREDICTED if ok == 0 else EXIT_SOME_FAILED)
            return
        truths = None
        if true_lat is not None:
            if len(paths) != 1 and not views:
                fail(f"--true-lat/--true-lon describe one image, but {len(paths)} were given")
            if not (-90 <= true_lat <= 90 and -180 <= true_lon <= 180):
                fail(f"invalid --true-lat/--true-lon {true_lat}, {true_lon}")
            truths = [(true_lat, true_lon)]
        if views:
            if len(paths) < 2:
                fail(f"--views needs at least two views of the place, got {len(paths)}")
            paths = [paths]
        ok, bad = predict_paths(models, paths, top_k, json_out, truths, batch_size, engine.value, min_confidence, csv_out, force,
                                ensemble.value, tta=tta)
        if bad:
            raise typer.Exit(EXIT_NONE_PREDICTED if ok == 0 else EXIT_SOME_FAILED)


def main(argv: list[str] | None = None) -> None:
    """Entry for ``python -m geolocate.predict``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app(argv if argv is not None else sys.argv[1:])
