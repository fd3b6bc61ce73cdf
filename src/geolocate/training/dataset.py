"""Samples of one or more views: index rows grouped into samples, and torch Datasets over them.

An index row is one image. Rows of one multi-view sample share a ``group_id`` (the earth source with
``views: 4``, manifests with a ``view`` column) and each names its ``view`` (N/E/S/W); a row without a group is
a sample of its own. :func:`group_views` turns the rows into :class:`ViewSamples`: one row of the sample frame
per sample (its id, label, position, split, sequence), and a (G, V) table of the index rows in each view slot
(-1 = the view is missing).

Both datasets yield the sample contract ``{"images" | "features", "view_mask", "targets": {"label", "lat",
"lon"}, "id"}``: :class:`ViewImageDataset` decodes the V images ((V, 3, S, S), zeros where a view is missing or
unreadable), :class:`FeatureDataset` reads cached embeddings ((V, F)). A :class:`FeatureDataset` index may be a
list of indices, which gives a whole batch at once: :func:`feature_loader` uses that with a DataLoader whose
sampler yields batches (``batch_size=None``).
"""
from __future__ import annotations

import dataclasses as dc
from typing import Iterable, Sequence

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

VIEW_ORDER = ("N", "E", "S", "W")  # the slot order of the views a dataset holds, unless ``model.views`` names them
SAMPLE_COLUMNS = ("id", "label", "lat", "lon", "split", "sequence_id", "path")


@dc.dataclass
class ViewSamples:
    frame: pl.DataFrame   # one row per sample: SAMPLE_COLUMNS present in the index (``path``: its first view's)
    rows: np.ndarray      # (G, V) int64: index row of each view slot, -1 where the sample lacks that view
    slots: list[str]      # the view of each slot ("" = the one slot of single-view rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def mask(self) -> np.ndarray:
        return self.rows >= 0

    def gather(self, per_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row arrays (N, ...) -> per-sample views (G, V, ...) (zeros where missing) and the view mask (G, V)."""
        out = per_row[np.maximum(self.rows, 0)]
        out[~self.mask] = 0
        return out, self.mask.copy()


def view_slots(present: Iterable[str | None], views: Sequence[str] = ()) -> list[str]:
    """The slot names: ``views`` when given, else the views present (N, E, S, W first, then others sorted);
    [""] when no row names a view."""
    if views:
        return [str(v) for v in views]
    names = {str(v) for v in present if v not in (None, "")}
    return [v for v in VIEW_ORDER if v in names] + sorted(names - set(VIEW_ORDER)) or [""]


def select_views(df: pl.DataFrame, views: Sequence[str]) -> pl.DataFrame:
    """The rows of the views in ``views`` (rows without a view are kept: they are single-view samples)."""
    if not views or "view" not in df.columns:
        return df
    return df.filter(pl.col("view").is_null() | pl.col("view").is_in([str(v) for v in views]))


def group_views(df: pl.DataFrame, views: Sequence[str] = ()) -> ViewSamples:
    """Group index rows into samples by ``group_id`` (a row without one is its own sample), in order of first
    appearance. A row goes to the slot of its view; a row without a view to slot 0. Rows of views not in ``views``
    are left out. A sample with two images of one view, or whose views disagree on split or label, is a
    ValueError (one line naming it)."""
    view = df["view"] if "view" in df.columns else pl.Series("view", [None] * df.height, dtype=pl.Utf8)
    group = df["group_id"] if "group_id" in df.columns else pl.Series("group_id", [None] * df.height, dtype=pl.Utf8)
    slots = view_slots(view.unique().to_list(), views)
    where = {v: i for i, v in enumerate(slots)}
    t = pl.DataFrame({"row": np.arange(df.height, dtype=np.int64), "key": group.fill_null(df["id"]).cast(pl.Utf8),
                      "slot": view.cast(pl.Utf8).replace_strict(where, default=None, return_dtype=pl.Int64)})
    t = t.with_columns(pl.when(view.is_null()).then(0).otherwise(pl.col("slot")).alias("slot")).filter(pl.col("slot").is_not_null())
    dup = t.filter(pl.struct("key", "slot").is_duplicated())
    if dup.height:
        k, s = dup.row(0)[1:]
        raise ValueError(f"sample {k!r} has more than one image of view {slots[s] or '(none)'!r}: give each view once")
    keys = t["key"].unique(maintain_order=True)
    t = t.join(pl.DataFrame({"key": keys, "g": np.arange(len(keys), dtype=np.int64)}), on="key", how="left", maintain_order="left")
    rows = np.full((len(keys), len(slots)), -1, dtype=np.int64)
    rows[t["g"].to_numpy(), t["slot"].to_numpy()] = t["row"].to_numpy()
    cols = [c for c in SAMPLE_COLUMNS if c in df.columns and c != "id"]
    parts = df.select(cols).with_columns(g=pl.Series(np.full(df.height, -1, dtype=np.int64)))
    parts = parts[t["row"].to_numpy()].with_columns(g=t["g"])
    for c in ("split", "label"):
        if c in parts.columns:
            bad = parts.group_by("g").agg(pl.col(c).n_unique().alias("n")).filter(pl.col("n") > 1)
            if bad.height:
                raise ValueError(f"sample {keys[int(bad['g'][0])]!r}: its views are in different {c}s "
                                 f"({'give its views one sequence_id' if c == 'split' else 'give its views one location'})")
    first = rows[np.arange(len(keys)), (rows >= 0).argmax(axis=1)]
    frame = df[first].select(cols).with_columns(pl.Series("id", keys.to_list(), dtype=pl.Utf8)).select("id", *cols)
    return ViewSamples(frame, rows, slots)


def _targets(labels, lat, lon, idx) -> dict:
    return {"label": labels[idx], "lat": lat[idx], "lon": lon[idx]}


class FeatureDataset(Dataset):
    """Cached embeddings of multi-view samples: features (G, V, F), view mask (G, V), targets and ids.

    ``ds[i]`` is one sample; ``ds[[i, j, ...]]`` (a list or tensor of indices) is that batch, stacked."""

    def __init__(self, feats: torch.Tensor, view_mask: torch.Tensor | None, labels: torch.Tensor, lat: torch.Tensor,
                 lon: torch.Tensor, ids: Sequence[str] | None = None):
        if feats.dim() == 2:
            feats = feats[:, None]
        self.feats = feats
        self.mask = torch.ones(feats.shape[:2], dtype=torch.bool) if view_mask is None else view_mask.to(torch.bool)
        self.labels, self.lat, self.lon = labels, lat, lon
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(labels))]
        if not (len(self.feats) == len(self.mask) == len(labels) == len(lat) == len(lon) == len(self.ids)):
            raise ValueError("FeatureDataset: features, mask, targets and ids differ in length")

    @classmethod
    def of_split(cls, split, ids: Sequence[str] | None = None) -> "FeatureDataset":
        return cls(split.feats, split.view_mask, split.labels, split.lat, split.lon, ids)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx):
        ids = [self.ids[i] for i in torch.as_tensor(idx).tolist()] if not isinstance(idx, int) else self.ids[idx]
        return {"features": self.feats[idx], "view_mask": self.mask[idx], "targets": _targets(self.labels, self.lat, self.lon, idx),
                "id": ids}


def feature_loader(dataset: FeatureDataset, batches: Iterable[torch.Tensor]) -> DataLoader:
    """A DataLoader over ``dataset`` yielding the given index batches (each fetched as one stacked batch). Its own
    generator: iterating it draws nothing from torch's global one (so dropout sees the numbers it would without it)."""
    return DataLoader(dataset, sampler=list(batches), batch_size=None, num_workers=0, generator=torch.Generator().manual_seed(0))


def sequential_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@torch.no_grad()
def fused_features(fusion: torch.nn.Module, split, batch_size: int = 4096) -> torch.Tensor:
    """(N, F') features of a multi-view split through ``fusion`` (in its current mode), over a DataLoader."""
    loader = feature_loader(FeatureDataset.of_split(split), sequential_batches(len(split), batch_size))
    outs = [fusion(b["features"], b["view_mask"]) for b in loader]
    return torch.cat(outs) if outs else torch.zeros(0, fusion.out_features)


class ViewImageDataset(Dataset):
    """Images of multi-view samples: ``ds[i]["images"]`` is (V, 3, S, S) preprocessed by ``preprocess``; a view that
    is missing or does not decode is zeros with ``view_mask`` False (an unreadable one is reported once)."""

    def __init__(self, paths: Sequence[str], samples: ViewSamples, preprocess):
        self.paths, self.samples, self.preprocess = list(paths), samples, preprocess
        f = samples.frame
        self.labels = torch.tensor(f["label"].to_numpy(), dtype=torch.long)
        self.lat = torch.tensor(f["lat"].to_numpy(), dtype=torch.float64)
        self.lon = torch.tensor(f["lon"].to_numpy(), dtype=torch.float64)
        self.ids = f["id"].to_list()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        from ..io import ImageError
        from ..progress import console, tagged

        size = self.preprocess.size
        rows = self.samples.rows[i]
        images = torch.zeros(len(rows), 3, size, size)
        mask = torch.zeros(len(rows), dtype=torch.bool)
        for v, r in enumerate(rows):
            if r < 0:
                continue
            try:
                images[v] = torch.from_numpy(self.preprocess.load_array(self.paths[r]))
                mask[v] = True
            except ImageError as e:
                console.print(tagged("skipped", e, "red"), highlight=False, soft_wrap=True)
        return {"images": images, "view_mask": mask, "targets": _targets(self.labels, self.lat, self.lon, i), "id": self.ids[i]}
