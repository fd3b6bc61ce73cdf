"""Mapillary street-level images (Graph API v4), CC BY-SA 4.0.

``geolocate download --city Lyon`` (or ``--bbox W,S,E,N``, ``--batch cities/batch_01.csv``)
grows ``data/raw/mapillary/<id>.jpg`` and ``data/records/mapillary.jsonl`` with a
resumable ledger in ``data/state/mapillary.sqlite``. The token is read from
``MAPILLARY_ACCESS_TOKEN`` and never written anywhere.
"""
from __future__ import annotations

from pathlib import Path

from ..base import Skipped, SourceResult, read_records, records_dir, register_source
from .areas import Area, AreaError, find_city, parse_bbox, read_cities_csv
from .client import AuthError, MapillaryClient, MapillaryError, QuotaError, RetryPolicy, TokenBucket
from .downloader import Downloader, Options, OptionError, RunStats, areas_from_config, download, token_from_env
from .ledger import Ledger, LockedError

__all__ = ["Area", "AreaError", "AuthError", "Downloader", "Ledger", "LockedError", "MapillaryClient", "MapillaryError",
           "OptionError", "Options", "QuotaError", "RetryPolicy", "RunStats", "TokenBucket", "areas_from_config",
           "build_mapillary", "download", "find_city", "parse_bbox", "read_cities_csv", "token_from_env"]


@register_source("mapillary")
def build_mapillary(cfg, out_dir: Path, progress=None) -> SourceResult:
    """Download the areas named in ``cfg.source.mapillary`` into ``out_dir``; return every Mapillary record."""
    mc = cfg.source.mapillary
    areas = areas_from_config(mc)   # AreaError / OptionError are ValueErrors already
    try:
        download(mc, areas, cfg.paths.data_dir, token_from_env(), raw_dir=out_dir, progress=progress)
    except (MapillaryError, LockedError) as e:
        # callers (build-dataset) turn ValueErrors into one error line
        raise ValueError(str(e)) from e
    path = records_dir(cfg.paths.data_dir) / "mapillary.jsonl"
    records = list(read_records(path)) if path.exists() else []
    with Ledger(Path(cfg.paths.data_dir) / "state" / "mapillary.sqlite") as ledger:
        skipped = [Skipped(path=r["id"], reason=r["error"] or "failed") for r in ledger.failed_rows()]
    return SourceResult(records=records, skipped=skipped)
