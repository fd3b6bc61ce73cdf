"""The dataset index: images.parquet, labels.json, stats.json, splits.parquet, coverage map."""
from .build import IndexPaths, build_index, load_index
from .split import make_splits

__all__ = ["IndexPaths", "build_index", "load_index", "make_splits"]
