"""Dataset commands: build-dataset, index, split, cache-compact."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..progress import tagged
from .common import ConfigOpt, SetOpt, err_console, fail, human_bytes, load_config, out_console


def build_dataset(cfg, source: str) -> int:
    """Run one source; print skipped inputs one line each; return the record count."""
    from ..progress import progress_bar
    from ..sources import get_source

    try:
        fn = get_source(source)
    except KeyError as e:
        fail(str(e.args[0]))
    total = cfg.source.earth.count if source == "earth" else None
    out_dir = Path(cfg.paths.data_dir) / "raw" / source
    try:
        with progress_bar(f"build-dataset ({source})", total) as advance:
            result = fn(cfg, out_dir, advance)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    for s in result.skipped:
        err_console.print(tagged("skipped", f"{s.path}: {s.reason}"), highlight=False, soft_wrap=True)
    out_console.print(f"{source}: {len(result.records)} images recorded, {len(result.skipped)} skipped")
    return len(result.records)


def build_index_cmd(cfg) -> dict:
    from ..index import build_index

    try:
        stats = build_index(cfg)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    indexed = stats["sources"]
    chosen = f"index.sources={','.join(cfg.index.sources)}" if cfg.index.sources else \
        "every records file in data/records (choose with --source NAME or index.sources)"
    out_console.print("index sources: " + ", ".join(f"{k} {indexed.get(k, 0)} of {n} records" for k, n in stats["records_per_source"].items())
                      + f" ({chosen})", highlight=False, soft_wrap=True)
    out_console.print(f"index: {stats['images']} images in {stats['cells']} cells "
                      f"(per cell min {stats['per_cell']['min']}, median {stats['per_cell']['median']:.0f}, max {stats['per_cell']['max']}; "
                      f"dropped {stats['dropped_small_cells']} in small cells) -> {Path(cfg.paths.data_dir) / 'index'}", markup=False)
    return stats


def split_cmd(cfg) -> dict:
    from ..index import make_splits

    try:
        counts = make_splits(cfg)
    except FileNotFoundError as e:
        fail(str(e))
    out_console.print("split: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def compact_caches(cache_dir: Path) -> int:
    """Compact every embedding store under ``cache_dir`` (one line each); return how many were busy or unreadable."""
    from ..training.store import INDEX, EmbeddingStore, StoreBusy, StoreError

    roots = sorted(p.parent for p in cache_dir.glob(f"*/{INDEX}"))
    if not roots:
        out_console.print(f"cache-compact: no embedding store under {cache_dir}", markup=False, highlight=False, soft_wrap=True)
        return 0
    problems = 0
    for root in roots:
        try:
            r = EmbeddingStore.at(root).compact()
        except StoreBusy as e:
            problems += 1
            err_console.print(tagged("warning", str(e)), highlight=False, soft_wrap=True)
            continue
        except StoreError as e:
            problems += 1
            err_console.print(tagged("error", str(e), "red"), highlight=False, soft_wrap=True)
            continue
        out_console.print(f"{root.name}: {r.entries} entries; {r.rows_before} rows in {r.shards_before} shard file(s) -> "
                          f"{r.rows_after} in {r.shards_after}, freed {human_bytes(r.bytes_freed)}",
                          markup=False, highlight=False, soft_wrap=True)
    return problems


def register(app: typer.Typer) -> None:
    @app.command("build-dataset")
    def build_dataset_command(
        source: Annotated[str, typer.Option("--source", help="earth | folder | manifest | mapillary")] = "earth",
        path: Annotated[Optional[Path], typer.Option("--path", help="folder of photos (folder) or CSV/parquet (manifest)")] = None,
        count: Annotated[Optional[int], typer.Option("--count", help="earth: number of patches")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
        index: Annotated[bool, typer.Option("--index/--no-index", help="rebuild the index and splits afterwards, "
                                                                 "from this source's records only unless index.sources is set")] = False,
    ):
        """Acquire images from a source and record them under data/records/."""
        overrides = list(set_ or [])
        if path is not None:
            overrides.append(f"source.{source}.path={path}")
        if count is not None:
            overrides.append(f"source.earth.count={count}")
        cfg = load_config(config, overrides)
        cfg.source.name = source
        build_dataset(cfg, source)
        if index:
            cfg.index.sources = cfg.index.sources or [source]
            build_index_cmd(cfg)
            split_cmd(cfg)

    @app.command("index")
    def index_command(
        config: ConfigOpt = None,
        set_: SetOpt = None,
        source: Annotated[Optional[list[str]], typer.Option("--source", help="index only these sources' records "
                                                                             "(repeatable; default index.sources, else all)")] = None,
    ):
        """Rebuild data/index/ (images.parquet, labels.json, stats.json) from the records; `split` draws coverage.png."""
        cfg = load_config(config, set_)
        if source:
            cfg.index.sources = list(source)
        build_index_cmd(cfg)

    @app.command("split")
    def split_command(config: ConfigOpt = None, set_: SetOpt = None):
        """Sequence-aware train/val/test split (data/index/splits.parquet)."""
        split_cmd(load_config(config, set_))

    @app.command("cache-compact")
    def cache_compact_command(config: ConfigOpt = None, set_: SetOpt = None):
        """Rewrite each embedding store under data/cache/embeddings/ to the rows its index references (features of
        changed images, crashed appends and one small shard per run go). A store in use by a run or bench is left
        as it is (exit 1); the ids and features kept are unchanged."""
        cfg = load_config(config, set_)
        if compact_caches(Path(cfg.paths.data_dir) / "cache" / "embeddings"):
            raise typer.Exit(1)
