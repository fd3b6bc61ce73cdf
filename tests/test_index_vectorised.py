"""Vectorised H3 cell assignment and sequence-aware splits against simple per-row references."""
from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

import h3
import numpy as np
import pytest

from geolocate.index.build import _h3_parent, assign_cells
from geolocate.index.split import SPLITS, assign_splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_index import loop_assign_cells  # noqa: E402


def reference_cells(lat, lon, resolution, min_samples, policy):
    """The original per-row loop (kept in the benchmark, which times it against the vectorised version)."""
    return loop_assign_cells(lat, lon, resolution, min_samples, policy)


def clustered_points(n: int, seed: int, clusters: int = 25, spread_deg: float = 2.5):
    """Street-view-like data: dense clusters (cities) plus a uniform sprinkle, poles and antimeridian included."""
    rng = np.random.default_rng(seed)
    centres = np.c_[rng.uniform(-70, 75, clusters), rng.uniform(-180, 180, clusters)]
    k = rng.integers(0, clusters, n)
    lat = np.clip(centres[k, 0] + rng.normal(0, spread_deg, n), -89.9, 89.9)
    lon = (centres[k, 1] + rng.normal(0, spread_deg, n) + 180) % 360 - 180
    m = n // 10
    lat[:m] = np.degrees(np.arcsin(rng.uniform(-1, 1, m)))
    lon[:m] = rng.uniform(-180, 180, m)
    if n >= m + 4:
        lat[m:m + 4], lon[m:m + 4] = [89.99, -89.99, 0.0, 10.0], [0.0, 179.999, -180.0, 180.0]
    return lat, lon


@pytest.mark.parametrize("n,resolution,min_samples,policy", [
    (3000, 3, 5, "merge"), (3000, 2, 8, "drop"), (4000, 4, 20, "merge"), (2000, 1, 1, "merge"),
    (500, 2, 400, "merge"), (1500, 0, 30, "merge"), (0, 2, 3, "merge"),
])
def test_assign_cells_matches_the_loop(n, resolution, min_samples, policy):
    lat, lon = clustered_points(n, seed=n + resolution)
    got = assign_cells(lat, lon, resolution, min_samples, policy)
    assert isinstance(got, list) and len(got) == n
    assert got == reference_cells(lat, lon, resolution, min_samples, policy)
    kept = [c for c in got if c is not None]
    assert all(h3.is_valid_cell(c) for c in kept)
    assert all(v >= min_samples for v in Counter(kept).values())


def test_h3_parent_bit_arithmetic_matches_h3():
    lat, lon = clustered_points(300, seed=7)
    for res in (1, 5, 9, 15):
        cells = np.array([h3.str_to_int(h3.latlng_to_cell(a, o, res)) for a, o in zip(lat, lon)], dtype=np.uint64)
        for parent in range(res):
            want = [h3.str_to_int(h3.cell_to_parent(h3.int_to_str(int(c)), parent)) for c in cells]
            assert _h3_parent(cells, parent).tolist() == want


def reference_split_sizes(sequence_ids, ratios, seed):
    """The original greedy assignment (sequence to the split furthest below its target)."""
    seq, sizes = np.unique(np.asarray(sequence_ids, dtype=object).astype(str), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(seq))
    target, filled = np.asarray(ratios, float), np.zeros(3)
    for i in order:
        deficit = target * (filled.sum() + sizes[i]) - filled
        filled[int(np.argmax(np.where(target > 0, deficit, -np.inf)))] += sizes[i]
    return filled


def _sequences(n_seq: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, n_seq)
    ids = [f"seq-{i:05d}" for i, n in enumerate(lengths) for _ in range(n)]
    rng.shuffle(ids)
    return ids


@pytest.mark.parametrize("ratios", [[0.8, 0.15, 0.05], [0.7, 0.15, 0.15], [0.5, 0.5, 0.0], [0.8, 0.0, 0.2], [1.0, 0.0, 0.0]])
def test_assign_splits_keeps_sequences_whole_and_tracks_ratios(ratios):
    ids = _sequences(700, seed=3)
    mapping = assign_splits(ids, ratios, seed=0)
    assert set(mapping) == set(ids) and set(mapping.values()) <= set(SPLITS)
    per_split: dict[str, set] = defaultdict(set)
    for s in ids:                       # a sequence never crosses splits: one split per sequence id
        per_split[mapping[s]].add(s)
    assert sum(len(v) for v in per_split.values()) == len(set(ids))
    counts = Counter(mapping[s] for s in ids)
    longest = max(Counter(ids).values())
    for name, r in zip(SPLITS, ratios):
        if r == 0:
            assert counts[name] == 0
        else:
            assert abs(counts[name] - r * len(ids)) <= longest, (name, counts, ratios)
    ref = reference_split_sizes(ids, ratios, seed=0)  # as close to the targets as the greedy loop was, within a sequence
    for name, r, ref_n in zip(SPLITS, ratios, ref):
        assert abs(abs(counts[name] - r * len(ids)) - abs(ref_n - r * len(ids))) <= longest


def test_assign_splits_is_seeded_and_accepts_any_ids():
    ids = _sequences(300, seed=5)
    a = assign_splits(ids, [0.8, 0.15, 0.05], seed=1)
    assert a == assign_splits(list(reversed(ids)), [0.8, 0.15, 0.05], seed=1)  # order of rows does not matter
    assert a != assign_splits(ids, [0.8, 0.15, 0.05], seed=2)
    assert assign_splits([], [0.8, 0.15, 0.05], 0) == {}
    m = assign_splits(np.array([1, 1, 2, 3, 3, 3]), [0.5, 0.25, 0.25], 0)   # non-string ids become strings
    assert set(m) == {"1", "2", "3"}
    m = assign_splits(["a", None, "a", None], [0.5, 0.5, 0.0], 0)            # None is the sequence "None", as str() spells it
    assert set(m) == {"a", "None"} and set(m.values()) <= {"train", "val"}


def test_many_rows_are_fast():
    """The point of vectorising: 300k rows through cells + splits in about a second (the loop took ~10 s)."""
    import time

    rng = np.random.default_rng(0)
    n = 300_000
    lat, lon = np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, n))), rng.uniform(-180, 180, n)
    t0 = time.perf_counter()
    cells = assign_cells(lat, lon, 2, 50, "merge")
    mapping = assign_splits([f"s{i // 6}" for i in range(n)], [0.8, 0.15, 0.05], 0)
    elapsed = time.perf_counter() - t0
    assert len(cells) == n and len(mapping) == -(-n // 6)
    assert elapsed < 15, f"{elapsed:.1f} s for {n} rows"
