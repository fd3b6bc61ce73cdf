"""``geolocate download`` / ``batch`` / ``clean-raw``: grow the dataset from Mapillary."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..progress import tagged
from .common import ConfigOpt, SetOpt, err_console, fail, human_bytes, load_config, out_console

# the order `geolocate batch` runs things in; a missing command is skipped with a warning
BATCH_STEPS = ("download", "index", "split", "train", "export", "clean-raw")


def _geolocate_argv() -> list[str]:
    """How to call this CLI again: the console script next to the interpreter, else ``python -c``."""
    script = Path(sys.executable).parent / "geolocate"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from geolocate.cli import app; app()"]


def register(app: typer.Typer) -> None:
    @app.command("download")
    def download_cmd(
        bbox: Annotated[Optional[str], typer.Option("--bbox", help="area W,S,E,N in degrees (lon,lat,lon,lat)")] = None,
        city: Annotated[Optional[str], typer.Option("--city", help="a city from cities/*.csv, e.g. Lyon")] = None,
        batch: Annotated[Optional[Path], typer.Option("--batch", help="CSV of cities: city,lat,lon,radius_km (or city,bbox)")] = None,
        max_images: Annotated[Optional[int], typer.Option("--max-images", help="cap per city / bbox (0 = none)")] = None,
        is_pano: Annotated[Optional[str], typer.Option("--is-pano", help="false: skip panoramas (default), true: only panoramas, any")] = None,
        min_quality: Annotated[Optional[float], typer.Option("--min-quality", help="keep images with quality_score >= this")] = None,
        since: Annotated[Optional[str], typer.Option("--since", help="captured on/after this date (YYYY-MM-DD)")] = None,
        until: Annotated[Optional[str], typer.Option("--until", help="captured on/before this date (YYYY-MM-DD)")] = None,
        workers: Annotated[Optional[int], typer.Option("--workers", help="concurrent downloads")] = None,
        thumb_size: Annotated[Optional[str], typer.Option("--thumb-size", help="256, 1024, 2048 or original")] = None,
        data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="data directory (default: paths.data_dir)")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Download Mapillary street-level images (token: MAPILLARY_ACCESS_TOKEN); re-run to resume."""
        from ..sources.mapillary import (AreaError, AuthError, LockedError, MapillaryError, OptionError, Options,
                                         areas_from_config, download, parse_bbox, token_from_env)

        cfg = load_config(config, set_)
        mc = cfg.source.mapillary
        try:
            if bbox is not None or city is not None or batch is not None:   # areas on the command line replace the config's
                mc.bbox = list(parse_bbox(bbox, where="--bbox")) if bbox is not None else []
                mc.city = city or ""
                mc.cities_csv = str(batch) if batch is not None else ""
            for name, value in (("max_images", max_images), ("is_pano", is_pano), ("min_quality", min_quality),
                                ("since", since), ("until", until), ("workers", workers), ("thumb_size", thumb_size)):
                if value is not None:
                    setattr(mc, name, value)
            if data_dir is not None:
                cfg.paths.data_dir = str(data_dir)
            Options.from_config(mc)
            areas = areas_from_config(mc)
            token = token_from_env()
        except (AreaError, OptionError, AuthError) as e:
            fail(str(e))
        try:
            stats = download(mc, areas, cfg.paths.data_dir, token)
        except (AuthError, LockedError) as e:
            fail(str(e))
        except MapillaryError as e:
            fail(f"{e} (re-run the same command to resume)", code=1)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted:[/] finished images are kept; re-run the same command to resume", highlight=False, soft_wrap=True)
            raise typer.Exit(130)
        s = stats
        out_console.print(
            f"mapillary: {len(areas)} area(s); listed {s.listed} new, downloaded {s.downloaded} ({human_bytes(s.bytes)})"
            + (f", adopted {s.adopted}" if s.adopted else "") + (f", failed {s.failed}" if s.failed else "")
            + f"; {s.done_total} images in total in {Path(cfg.paths.data_dir) / 'records' / 'mapillary.jsonl'}"
            + (f"; waited {s.quota_wait_s:.0f}s on the quota" if s.quota_waits else "") + f" ({s.elapsed_s:.1f}s)",
            highlight=False, soft_wrap=True)
        for line in s.failures[:5]:
            err_console.print(tagged("warning", line), highlight=False, soft_wrap=True)
        if s.failed:
            err_console.print(f"[yellow]warning:[/] {s.failed} image(s) failed; a re-run retries them", highlight=False, soft_wrap=True)

    @app.command("clean-raw")
    def clean_raw_cmd(
        dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would be deleted")] = False,
        data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="data directory (default: paths.data_dir)")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Delete raw image files already in the index (data/index/images.parquet); nothing else."""
        from ..sources.mapillary.clean import CleanError, clean_raw

        cfg = load_config(config, set_)
        root = Path(data_dir) if data_dir is not None else Path(cfg.paths.data_dir)
        try:
            plan = clean_raw(root, dry_run=dry_run)
        except CleanError as e:
            fail(str(e))
        verb = "would delete" if dry_run else "deleted"
        if dry_run:
            for f in plan.files[:20]:
                out_console.print(f"  {f}", highlight=False, soft_wrap=True)
            if len(plan.files) > 20:
                out_console.print(f"  ... and {len(plan.files) - 20} more", highlight=False, soft_wrap=True)
        out_console.print(f"clean-raw: {verb} {len(plan.files)} raw file(s) under {root / 'raw'}, freeing {human_bytes(plan.bytes)}"
                          f" ({plan.indexed} indexed, {plan.already_gone} already gone, {plan.outside_raw} outside raw/ kept)",
                          highlight=False, soft_wrap=True)

    @app.command("batch")
    def batch_cmd(
        cities_csv: Annotated[Path, typer.Argument(help="cities CSV, e.g. cities/batch_01.csv")],
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Run download -> index -> split -> train -> export -> clean-raw for one batch of cities."""
        from ..sources.mapillary import AreaError, AuthError, read_cities_csv, token_from_env

        load_config(config, set_)   # a bad config fails here, before any work
        try:
            areas = read_cities_csv(cities_csv)
            token_from_env()
        except (AreaError, AuthError) as e:
            fail(str(e))
        commands = getattr(typer.main.get_command(app), "commands", {})
        out_console.print(f"batch {cities_csv}: {len(areas)} cities ({', '.join(a.name for a in areas)})", highlight=False, soft_wrap=True)
        for step in BATCH_STEPS:
            cmd = commands.get(step)
            if cmd is None:
                err_console.print(tagged("warning", f"skipping {step}: this version has no `geolocate {step}` command"), highlight=False, soft_wrap=True)
                continue
            opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
            argv = [*_geolocate_argv(), step] + (["--batch", str(cities_csv)] if step == "download" else [])
            if config is not None and "--config" in opts:
                argv += ["--config", str(config)]
            if "--set" in opts:
                for item in set_ or []:
                    argv += ["--set", item]
            out_console.print(tagged(f"== {step}", ' '.join(argv[len(_geolocate_argv()):]), "bold"), highlight=False, soft_wrap=True)
            rc = subprocess.call(argv)
            if rc != 0:
                fail(f"batch step `{step}` failed (exit {rc}); fix it and re-run `geolocate batch {cities_csv}`: finished steps resume", code=rc)
        out_console.print(f"batch {cities_csv}: done", highlight=False, soft_wrap=True)
