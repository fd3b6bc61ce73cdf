"""A sharded, memory-mapped float16 embedding store: bounded RAM for millions of cached embeddings.

Layout of one backbone's store, ``<cache_dir>/<backbone cache_name>/``::

    shard-000.npy, shard-001.npy, ...   (rows, F) float16, written once and never changed (numpy .npy, memory-mapped)
    index.parquet                       one row per id: id, digest, stamp, shard, row

An id's features live at ``shard-<shard>.npy[row]``; its ``digest`` (content hash of the image, ``""`` for an
entry migrated from a cache older than content digests, whose ``stamp`` is then its legacy key) and ``stamp``
(size:mtime when hashed) are what ``cached_embeddings`` looks them up by. New features are appended as a new
shard, then the index is replaced atomically, both under a file lock, so concurrent runs never lose each
other's entries and a crash leaves at worst an unreferenced shard (overwritten by the next append).

Reading never loads the store: :class:`FeatureView` is a list of rows over the memory maps and gathers a batch
at a time (``view.rows(idx)``, ``view[a:b]``) as float32; only the pages touched are read. 1M x 1280 features
take 2.6 GB on disk instead of 5.1 GB of float32 in RAM. The single-file ``<cache_name>.npz`` cache of earlier
versions is migrated into the store the first time it is opened (the npz file is left in place, unused).
"""
from __future__ import annotations

import dataclasses as dc
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..io import atomic_write
from ..progress import console, tagged

INDEX = "index.parquet"
SHARD_ROWS = 1 << 17   # rows per shard written by one append (131072 x 1280 float16 = 335 MB)
CONTIGUOUS_READ = 4096  # a gather of at least this many consecutive rows of a shard reads the file instead of the map


def shard_name(i: int) -> str:
    return f"shard-{i:03d}.npy"


@dc.dataclass
class StoreIndex:
    """The index as arrays (no per-row Python objects): ids, digests, stamps (str), shard (int32), row (int64)."""
    ids: np.ndarray
    digests: np.ndarray
    stamps: np.ndarray
    shard: np.ndarray
    row: np.ndarray

    @classmethod
    def empty(cls) -> "StoreIndex":
        s = np.asarray([], dtype=object)
        return cls(s, s.copy(), s.copy(), np.zeros(0, np.int32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.ids)


class StoreError(ValueError):
    """A store whose index or shards are unreadable or inconsistent."""


class EmbeddingStore:
    """One backbone's sharded store; see the module docstring."""

    def __init__(self, root: str | Path, num_features: int):
        self.root = Path(root)
        self.num_features = int(num_features)
        self._maps: dict[int, np.ndarray] = {}
        self.index = self._read_index()

    # ---- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, cache_dir: str | Path, name: str, num_features: int) -> "EmbeddingStore":
        """The store ``<cache_dir>/<name>/``, created (and an older ``<name>.npz`` cache migrated) when absent.

        A store of another feature size, or one whose files are unreadable, is started afresh (one warning line).
        """
        root = Path(cache_dir) / name
        try:
            store = cls(root, num_features)
        except StoreError as e:
            console.print(tagged("warning", f"{e}: rebuilding it"), highlight=False, soft_wrap=True)
            (root / INDEX).unlink(missing_ok=True)
            store = cls(root, num_features)
        if not (root / INDEX).exists():
            legacy = Path(cache_dir) / f"{name}.npz"
            if legacy.exists():
                store._migrate(legacy)
        return store

    def _read_index(self) -> StoreIndex:
        path = self.root / INDEX
        if not path.exists():
            return StoreIndex.empty()
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(path)
            col = lambda c: np.asarray(t.column(c).to_numpy(zero_copy_only=False))  # noqa: E731
            idx = StoreIndex(col("id").astype(object), col("digest").astype(object), col("stamp").astype(object),
                             col("shard").astype(np.int32), col("row").astype(np.int64))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise StoreError(f"embedding store {self.root}: index unreadable ({type(e).__name__})") from None
        self._maps = {}
        for s in np.unique(idx.shard).tolist():
            m = self._map(s)
            if m.ndim != 2 or m.shape[1] != self.num_features:
                raise StoreError(f"embedding store {self.root}: {shard_name(s)} holds {m.shape[-1]} features, "
                                 f"the backbone has {self.num_features}")
        if len(idx) and (idx.row.max() >= max(self._map(s).shape[0] for s in np.unique(idx.shard).tolist())):
            raise StoreError(f"embedding store {self.root}: index points past the end of a shard")
        return idx

    def _map(self, shard: int) -> np.ndarray:
        m = self._maps.get(shard)
        if m is None:
            path = self.root / shard_name(shard)
            try:
                m = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise StoreError(f"embedding store {self.root}: {shard_name(shard)} unreadable ({type(e).__name__})") from None
            self._maps[shard] = m
        return m

    def _migrate(self, legacy: Path) -> None:
        from .embeddings import load_cache

        entries = load_cache(legacy, self.num_features)
        if not entries:
            return
        ids = list(entries)
        self.commit({i: (entries[i].digest, entries[i].stamp, -1, k) for k, i in enumerate(ids)},
                    np.stack([entries[i].feat for i in ids]))
        console.print(f"embedding cache {legacy}: {len(ids)} entries migrated to the sharded store {self.root}",
                      markup=False, highlight=False, soft_wrap=True)

    # ---- reading ----------------------------------------------------------------
    def entries(self) -> dict[str, int]:
        """id -> position in ``self.index``."""
        return dict(zip(self.index.ids.tolist(), range(len(self.index))))

    def location(self, pos: np.ndarray) -> np.ndarray:
        """(n, 2) int64 (shard, row) of index positions; -1 rows for positions < 0."""
        pos = np.asarray(pos, np.int64)
        out = np.full((len(pos), 2), -1, np.int64)
        ok = pos >= 0
        out[ok, 0], out[ok, 1] = self.index.shard[pos[ok]], self.index.row[pos[ok]]
        return out

    def view(self, locations: np.ndarray) -> "FeatureView":
        """The features at (shard, row) ``locations`` (rows of -1: missing, read as NaN)."""
        return FeatureView(self, np.asarray(locations, np.int64).reshape(-1, 2))

    def features(self, ids: Sequence[str]) -> np.ndarray:
        """float32 features of ``ids`` (NaN for unknown ids)."""
        e = self.entries()
        return self.view(self.location(np.asarray([e.get(i, -1) for i in ids], np.int64))).rows(slice(None))

    # ---- writing ------------------------------------------------------------------
    def commit(self, changes: dict[str, tuple[str, str, int, int]], new_feats: np.ndarray | None = None) -> np.ndarray:
        """Apply ``changes`` (id -> (digest, stamp, shard, row)) and append ``new_feats`` in one locked update.

        A change whose shard is -1 refers to row ``row`` of ``new_feats``. Returns the (shard, row) locations of
        ``new_feats`` in the store. The index is re-read inside the lock, so entries another process committed
        meanwhile are kept.
        """
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".lock")):
            self.index = self._read_index()
            next_shard = int(self.index.shard.max()) + 1 if len(self.index) else 0
            new_loc = np.zeros((0, 2), np.int64)
            if new_feats is not None and len(new_feats):
                new_loc = self._append(np.asarray(new_feats), next_shard)
            old = self.entries()
            ids, dig, st, sh, rw = (list(a) for a in (self.index.ids, self.index.digests, self.index.stamps,
                                                       self.index.shard, self.index.row))
            for i, (d, s, shard, row) in changes.items():
                if shard < 0:
                    shard, row = new_loc[row]
                j = old.get(i)
                if j is None:
                    old[i] = len(ids)
                    ids.append(i), dig.append(d), st.append(s), sh.append(shard), rw.append(row)
                else:
                    dig[j], st[j], sh[j], rw[j] = d, s, shard, row
            self.index = StoreIndex(np.asarray(ids, dtype=object), np.asarray(dig, dtype=object), np.asarray(st, dtype=object),
                                    np.asarray(sh, np.int32), np.asarray(rw, np.int64))
            self._write_index()
        return new_loc

    def append(self, ids: Sequence[str], digests: Sequence[str], stamps: Sequence[str], feats: np.ndarray) -> np.ndarray:
        """Add ``feats`` under ``ids`` (replacing entries of the same id); their (shard, row) locations."""
        return self.commit({i: (d, s, -1, k) for k, (i, d, s) in enumerate(zip(ids, digests, stamps))}, feats)

    def _append(self, feats: np.ndarray, first_shard: int) -> np.ndarray:
        if feats.ndim != 2 or feats.shape[1] != self.num_features:
            raise ValueError(f"embedding store {self.root}: features of shape {feats.shape}, expected (n, {self.num_features})")
        loc = np.zeros((len(feats), 2), np.int64)
        for k, s in enumerate(range(0, len(feats), SHARD_ROWS)):
            block = np.ascontiguousarray(feats[s:s + SHARD_ROWS], dtype=np.float16)
            shard = first_shard + k
            atomic_write(self.root / shard_name(shard), lambda p, b=block: np.save(p, b, allow_pickle=False), suffix=".npy")
            self._maps.pop(shard, None)
            loc[s:s + len(block), 0], loc[s:s + len(block), 1] = shard, np.arange(len(block))
        return loc

    def _write_index(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        i = self.index
        table = pa.table({"id": pa.array(i.ids.tolist(), pa.string()), "digest": pa.array(i.digests.tolist(), pa.string()),
                          "stamp": pa.array(i.stamps.tolist(), pa.string()), "shard": pa.array(i.shard, pa.int32()),
                          "row": pa.array(i.row, pa.int64())})
        atomic_write(self.root / INDEX, lambda p: pq.write_table(table, p), suffix=".parquet")


class FeatureView:
    """Rows of an :class:`EmbeddingStore` (or of a plain array, ``FeatureView.of``), read lazily as float32.

    ``len(v)``, ``v.shape``; ``v.rows(idx)`` / ``v[idx]`` / ``v[a:b]``: float32 ``np.ndarray`` of those rows (NaN for
    missing ones); ``v.select(mask_or_idx)``: a sub-view; ``FeatureView.concat(views)``; ``np.asarray(v)``: all rows
    (only for small views). Gathering sorts the rows of each shard, so a random batch reads pages in file order.
    """

    def __init__(self, store: EmbeddingStore | None, loc: np.ndarray, dense: np.ndarray | None = None):
        self.store, self.loc, self.dense = store, loc, dense

    @classmethod
    def of(cls, array: np.ndarray) -> "FeatureView":
        """A view over an in-memory array (rows = positions)."""
        n = len(array)
        return cls(None, np.stack([np.zeros(n, np.int64), np.arange(n, dtype=np.int64)], 1), np.asarray(array))

    @property
    def num_features(self) -> int:
        return self.store.num_features if self.store is not None else self.dense.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.loc), self.num_features)

    def __len__(self) -> int:
        return len(self.loc)

    def select(self, key) -> "FeatureView":
        key = _as_numpy_index(key)
        return FeatureView(self.store, self.loc[key], self.dense)

    @staticmethod
    def concat(views: Iterable["FeatureView"]) -> "FeatureView":
        views = list(views)
        root = lambda v: None if v.store is None else v.store.root  # noqa: E731 - shards never change: one root, one store
        if any(root(v) != root(views[0]) or v.dense is not views[0].dense for v in views):
            raise ValueError("FeatureView.concat: the views must come from one store")
        return FeatureView(views[-1].store, np.concatenate([v.loc for v in views]), views[0].dense)

    def rows(self, key) -> np.ndarray:
        key = _as_numpy_index(key)
        if isinstance(key, (int, np.integer)):
            return self.rows(np.asarray([key]))[0]
        loc = self.loc[key].reshape(-1, 2)
        out = np.full((len(loc), self.num_features), np.nan, np.float32)
        if self.dense is not None:
            ok = loc[:, 1] >= 0
            out[ok] = self.dense[loc[ok, 1]]
            return out
        for s in np.unique(loc[:, 0]).tolist():
            if s < 0:
                continue
            where = np.flatnonzero(loc[:, 0] == s)
            order = np.argsort(loc[where, 1], kind="stable")
            rows = loc[where[order], 1]
            mm = self.store._map(s)
            if len(rows) >= CONTIGUOUS_READ and rows[-1] - rows[0] + 1 == len(rows):
                out[where[order]] = _read_rows(mm, int(rows[0]), len(rows))
            else:
                out[where[order]] = mm[rows]
        return out

    __getitem__ = rows

    def __array__(self, dtype=None, copy=None):
        a = self.rows(slice(None))
        return a if dtype is None else a.astype(dtype)

    def ok(self) -> np.ndarray:
        """Which rows exist (not missing)."""
        return self.loc[:, 1] >= 0


def _read_rows(mm: np.memmap, start: int, count: int) -> np.ndarray:
    """Rows ``start:start+count`` of a shard read from its file: a long sequential read (a kNN or gallery block)
    through the page cache instead of the mapping, so it does not stay in this process's resident set."""
    f = mm.shape[1]
    with open(mm.filename, "rb") as fh:
        fh.seek(mm.offset + start * f * mm.dtype.itemsize)
        return np.fromfile(fh, dtype=mm.dtype, count=count * f).reshape(count, f)


def _as_numpy_index(key):
    if isinstance(key, (slice, int, np.integer)):
        return key
    if hasattr(key, "numpy"):  # a torch tensor
        key = key.numpy()
    return np.asarray(key)
