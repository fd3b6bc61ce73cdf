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

Appends never rewrite a shard, so features replaced by newer ones (an image whose content changed), crashed
appends and one small shard per run accumulate: :meth:`EmbeddingStore.compact` (``geolocate cache-compact``)
rewrites the rows the index references into full shards and deletes every other shard file. Every open store
holds a shared lock on ``.readers`` (its views read the shard files lazily); compaction needs the exclusive one,
so it never runs under a reader: a store in use is reported busy and left as it is.
"""
from __future__ import annotations

import dataclasses as dc
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: stores work, compaction does not
    fcntl = None

from ..io import atomic_write
from ..progress import console, tagged

INDEX = "index.parquet"
READERS = ".readers"  # every open store holds a shared flock on it; compaction takes it exclusively
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


class StoreBusy(StoreError):
    """A store another process (or another open store in this one) is reading: not compacted."""


@dc.dataclass(frozen=True)
class Compaction:
    """What :meth:`EmbeddingStore.compact` did: rows and shard files before and after, bytes freed."""
    root: Path
    entries: int        # ids in the index (unchanged)
    rows_before: int    # rows in the shard files before
    rows_after: int     # distinct rows the index references (the rows kept)
    shards_before: int  # shard files (temp files of crashed appends not counted, but deleted)
    shards_after: int
    bytes_freed: int


class EmbeddingStore:
    """One backbone's sharded store; see the module docstring."""

    def __init__(self, root: str | Path, num_features: int):
        self.root = Path(root)
        self.num_features = int(num_features)
        self._maps: dict[int, np.ndarray] = {}
        self._readers = _reader_lock(self.root)  # held while this store (or a view of it) lives
        self.index = self._read_index()

    @classmethod
    def at(cls, root: str | Path) -> "EmbeddingStore":
        """The existing store at ``root``, its feature size read off its shards."""
        root = Path(root)
        shards = sorted(root.glob("shard-*.npy"))
        if not (root / INDEX).exists() or not shards:
            raise StoreError(f"{root}: not an embedding store (no {INDEX} and shards)")
        try:
            f = np.load(shards[0], mmap_mode="r", allow_pickle=False).shape[1]
        except (OSError, ValueError, IndexError) as e:
            raise StoreError(f"embedding store {root}: {shards[0].name} unreadable ({type(e).__name__})") from None
        return cls(root, f)

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

    def compact(self, max_block_bytes: int = 256 << 20) -> Compaction:
        """Rewrite the rows the index references into full shards (numbered after every shard file present) and
        delete every other shard file: replaced features, rows of crashed appends, one small shard per append.

        Under the writers' lock and the exclusive readers' lock (:class:`StoreBusy` when another open store holds
        it). New shards are written first and the index replaced atomically before anything is deleted, so a crash
        leaves at worst unreferenced shards (the next compaction deletes them); ids, digests and features are
        unchanged (the same float16 values).
        """
        from filelock import FileLock

        if not (self.root / INDEX).exists():
            raise StoreError(f"{self.root}: not an embedding store (no {INDEX})")
        if self._readers is None:
            raise StoreError(f"embedding store {self.root}: compaction needs a lock file with flock (POSIX), not available here")
        with FileLock(str(self.root / ".lock")):
            try:
                fcntl.flock(self._readers, fcntl.LOCK_EX | fcntl.LOCK_NB)  # converts this store's own shared lock
            except BlockingIOError:
                fcntl.flock(self._readers, fcntl.LOCK_SH)  # a failed conversion may have dropped the shared lock
                raise StoreBusy(f"embedding store {self.root}: in use by another reader (a run or bench reading its embeddings): "
                                "not compacted; try again when it is idle") from None
            try:
                self.index = self._read_index()
                # every shard file, and the temp files of appends that crashed (no append runs under the lock)
                files = sorted(self.root.glob("shard-*.npy")) + sorted(self.root.glob(".shard-*"))
                numbers = [int(f.stem.split("-")[1]) for f in files if f.stem.startswith("shard-") and f.stem[6:].isdigit()]
                rows_before = sum(_rows_in(self.root / shard_name(n)) for n in numbers)
                bytes_before = sum(f.stat().st_size for f in files)
                loc = np.stack([self.index.shard.astype(np.int64), self.index.row], 1)
                keep, where = np.unique(loc, axis=0, return_inverse=True)  # distinct rows, in (shard, row) order
                if rows_before == len(keep) and len(files) == len(numbers) <= -(-len(keep) // SHARD_ROWS):
                    # already compact: every row referenced, full shards, no leftovers
                    return Compaction(self.root, len(self.index), rows_before, rows_before, len(numbers), len(numbers), 0)
                first = max(numbers, default=-1) + 1
                new_loc = np.zeros((len(keep), 2), np.int64)
                block = max(1, max_block_bytes // max(2 * self.num_features, 1))
                view = self.view(keep)
                for k, s0 in enumerate(range(0, len(keep), SHARD_ROWS)):  # one shard at a time, read in blocks
                    n = min(SHARD_ROWS, len(keep) - s0)
                    out = np.empty((n, self.num_features), np.float16)
                    for b in range(0, n, block):
                        out[b:b + block] = view.rows(slice(s0 + b, s0 + min(b + block, n)))
                    shard = first + k
                    atomic_write(self.root / shard_name(shard), lambda p, o=out: np.save(p, o, allow_pickle=False), suffix=".npy")
                    new_loc[s0:s0 + n, 0], new_loc[s0:s0 + n, 1] = shard, np.arange(n)
                moved = new_loc[where.ravel()]
                self.index = dc.replace(self.index, shard=moved[:, 0].astype(np.int32), row=moved[:, 1].astype(np.int64))
                self._maps = {}
                self._write_index()
                kept = {shard_name(int(x)) for x in np.unique(new_loc[:, 0]).tolist()} if len(keep) else set()
                for f in files:
                    if f.name not in kept:
                        f.unlink(missing_ok=True)
                after = sorted(self.root.glob("shard-*.npy"))
                return Compaction(self.root, len(self.index), int(rows_before), int(len(keep)), len(numbers), len(after),
                                  int(bytes_before - sum(f.stat().st_size for f in after)))
            finally:
                fcntl.flock(self._readers, fcntl.LOCK_SH)

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


def _rows_in(path: Path) -> int:
    """Rows of a shard file (0 when it is unreadable: compaction deletes it all the same)."""
    try:
        return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
    except (OSError, ValueError, IndexError):
        return 0


def _reader_lock(root: Path):
    """An open file on ``root/.readers`` holding a shared flock (released when it is closed or collected); None
    where the system or file system has no flock or the directory is read-only (the store works, compaction not)."""
    if fcntl is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fh = open(root / READERS, "a+b")  # noqa: SIM115 - lives as long as the store
    except OSError:
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_SH)  # waits while a compaction holds it exclusively
    except OSError:  # a file system without flock (some network mounts)
        fh.close()
        return None
    return fh


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
