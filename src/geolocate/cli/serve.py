"""Serving and export commands: serve, export-onnx, export-torchscript, export, verify-snapshot."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.text import Text

from ..progress import tagged
from .common import ConfigOpt, SetOpt, err_console, fail, load_config, out_console
from .predict import ENGINE_HELP, Engine

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="model file (.pt)")]
CheckOpt = Annotated[bool, typer.Option("--check/--no-check", help="compare with PyTorch (max |Δp| ≤ 1e-4)")]
CheckImagesOpt = Annotated[Optional[list[Path]], typer.Option("--check-images", help="images/folders for the parity check")]


def _check_images(paths: list[Path] | None) -> list[Path] | None:
    if not paths:
        return None
    from .predict import expand_inputs

    found = expand_inputs(paths)
    if not found:
        fail("no images found in --check-images")
    return found[:32]


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        model: ModelOpt = Path("models/best.pt"),
        host: Annotated[str, typer.Option("--host", help="address to bind (loopback by default)")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
        engine: Annotated[Engine, typer.Option("--engine", help=ENGINE_HELP, case_sensitive=False)] = Engine.auto,
        max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="largest accepted upload")] = 20.0,
        allowed_host: Annotated[Optional[list[str]], typer.Option(
            "--allowed-host", help="accepted Host header name, repeatable (e.g. geo.example.org, *.example.org); "
                                   "default: localhost and 127.0.0.1 on a loopback address, any elsewhere")] = None,
        max_inflight: Annotated[int, typer.Option("--max-inflight", min=1, help="photos processed at once")] = 4,
        max_queued: Annotated[int, typer.Option("--max-queued", min=0, help="photos waiting for a slot; more get 503")] = 16,
        batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0, help="micro-batching: how long a decoded upload waits for others to share its engine call")] = 2.0,
    ):
        """HTTP API (POST /predict, GET /health, GET /model, docs at /docs) and a web page at /."""
        import uvicorn

        from ..serving import Geolocator
        from ..serving.server import create_app, server_config

        try:
            geo = Geolocator.from_pretrained(model, engine=engine.value)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        try:
            exposed = not ipaddress.ip_address(host).is_loopback
        except ValueError:
            exposed = host != "localhost"
        if exposed:
            err_console.print(tagged("warning", f"listening on {host}: the API has no authentication"))
        hosts = list(allowed_host or ([] if exposed or ":" in host else ["localhost", "127.0.0.1", host]))
        if exposed and not hosts:
            err_console.print(tagged("warning", "any Host header is accepted: name this server's with --allowed-host"))
        shown = f"[{host}]" if ":" in host else host
        out_console.print(f"serving {model} ({engine.value}) on http://{shown}:{port}/  (API docs: /docs)", markup=False)
        app_ = create_app(geo, max_upload_mb=max_upload_mb, max_inflight=max_inflight, max_queued=max_queued, batch_wait_ms=batch_wait_ms,
                          allowed_hosts=hosts or None)
        uvicorn.Server(server_config(app_, host=host, port=port)).run()

    @app.command("export-onnx")
    def export_onnx_command(
        model: ModelOpt = Path("models/best.pt"),
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output file (default: the model path with .onnx)")] = None,
        check: CheckOpt = True, check_images: CheckImagesOpt = None,
    ):
        """ONNX file (opset 17, dynamic batch axis) returning logits and probabilities."""
        _run_export("export_onnx", model, out, check, check_images)

    @app.command("export-onnx-int8")
    def export_onnx_int8_command(
        model: ModelOpt = Path("models/best.pt"),
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output file (default: <model>.int8.onnx)")] = None,
        calibration: Annotated[Optional[list[Path]], typer.Option("--calibration", help="calibration images or folders (default: 128 images of the index's train split)")] = None,
        holdout: Annotated[Optional[list[Path]], typer.Option("--holdout", help="images to measure agreement on (default: 256 of the val split)")] = None,
        min_top1: Annotated[float, typer.Option("--min-top1", help="least top-1 agreement with fp32 on the held-out images")] = 0.90,
        min_cosine: Annotated[float, typer.Option("--min-cosine", help="least mean cosine with fp32 of the logits about their mean")] = 0.97,
        config: ConfigOpt = None, set_: SetOpt = None,
    ):
        """Static int8 ONNX (QDQ, per-channel), written only if it agrees with fp32 on held-out images; use with --engine onnx-int8."""
        from ..serving import export

        from .predict import expand_inputs

        cal = expand_inputs(calibration) if calibration else _split_images(config, set_, "train", 128)
        held = expand_inputs(holdout) if holdout else _split_images(config, set_, "val", 256)
        try:
            path, gate = export.export_onnx_int8(model, cal, held, out, min_top1=min_top1, min_cosine=min_cosine)
        except (FileNotFoundError, ValueError, export.ExportError, OSError) as e:
            fail(str(e))
        out_console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); on {gate['images']} held-out images: top-1 "
                          f"agreement {gate['top1_agreement']:.3f}, logits cosine {gate['mean_logits_cosine']:.4f}",
                          soft_wrap=True, highlight=False)

    @app.command("export-torchscript")
    def export_torchscript_command(
        model: ModelOpt = Path("models/best.pt"),
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output file (default: <model>.torchscript.pt)")] = None,
        check: CheckOpt = True, check_images: CheckImagesOpt = None,
    ):
        """Traced TorchScript file returning (logits, probabilities, features); load with torch.jit.load."""
        _run_export("export_torchscript", model, out, check, check_images)

    @app.command("export")
    def export_command(
        config: ConfigOpt = None, set_: SetOpt = None,
        name: Annotated[Optional[str], typer.Option("--name", help="snapshot name inside exports/ (default <UTC time>_<run_id>)")] = None,
    ):
        """Immutable snapshot exports/<UTC time>_<run_id>/: run artifacts, index, best model + ONNX, config, MANIFEST.sha256."""
        from ..serving.snapshot import SnapshotError, create_snapshot, verify_snapshot

        cfg = load_config(config, set_)
        try:
            path = create_snapshot(cfg, name=name)
        except (SnapshotError, FileNotFoundError, ValueError, OSError) as e:
            fail(str(e))
        report = verify_snapshot(path)
        if not report.ok:
            fail(f"snapshot {path} does not verify: " + "; ".join(report.lines()))
        out_console.print(f"snapshot {path}: {report.checked} files, MANIFEST.sha256 verified, read-only", soft_wrap=True, highlight=False, markup=False)

    @app.command("verify-snapshot")
    def verify_snapshot_command(path: Annotated[Path, typer.Argument(help="exports/<snapshot>")]):
        """Re-hash a snapshot against its MANIFEST.sha256; list changed, missing and extra files."""
        from ..serving.snapshot import verify_snapshot

        report = verify_snapshot(path)
        if report.ok:
            out_console.print(f"OK: {path}: {report.checked} files match MANIFEST.sha256", soft_wrap=True, highlight=False, markup=False)
            return
        for line in report.lines():
            err_console.print(Text(line, style="red"), highlight=False, soft_wrap=True)
        err_console.print(tagged("FAILED", f"{path}: {len(report.changed)} changed, {len(report.missing)} missing, "
                                 f"{len(report.extra)} extra, {len(report.problems)} other problems", "bold red"), highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _run_export(exporter: str, model: Path, out: Path | None, check: bool, check_images: list[Path] | None) -> None:
    """Run one of serving.export's exporters and report the file and its parity with PyTorch."""
    from ..serving import export

    try:
        path, diff = getattr(export, exporter)(model, out, check=check, check_images=_check_images(check_images))
    except (FileNotFoundError, ValueError, export.ExportError, OSError) as e:
        fail(str(e))
    _report(path, diff)


def _split_images(config, set_, split: str, n: int) -> list[str]:
    """Up to ``n`` image paths of one split of the current index, evenly spread."""
    import polars as pl

    from ..index import load_index

    try:
        df, _, _ = load_index(load_config(config, set_))
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e} (or give images with --calibration/--holdout)")
    if "split" not in df.columns:
        fail("no splits: run `geolocate split` first (or give images with --calibration/--holdout)")
    paths = df.filter(pl.col("split") == split)["path"].to_list()
    if not paths:
        fail(f"the {split} split is empty (give images with --calibration/--holdout)")
    return paths[::max(1, len(paths) // n)][:n]


def _report(path: Path, diff: float | None) -> None:
    size = path.stat().st_size / 1e6
    check = f"; max |p - p_torch| = {diff:.2e}" if diff is not None else "; not checked"
    out_console.print(f"wrote {path} ({size:.1f} MB){check}", soft_wrap=True, highlight=False, markup=False)
