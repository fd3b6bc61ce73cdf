"""The label space: the classes a model answers with, on one or more H3 levels.

``labels.json`` v2 (and the ``labels`` entry of a model file) is the v1 content — ``h3_resolution``,
``num_classes`` and ``classes`` (one row per fine class: cell, anchor lat/lon, place name, count) — plus
``version: 2`` and ``levels``: the coarser levels of a hierarchy, coarse to fine, each with its cells, their
centroids and place names, and for every fine class the index of its parent on that level.

Fine classes may be merged cells of mixed resolution (a small cell merged into its parent); a fine class
coarser than a level is its own parent there (the level then holds that coarser cell).

A v1 dict (no ``version``) loads as a one-level space. Anything else is a :class:`LabelSpaceError` with one line.
"""
from __future__ import annotations

import dataclasses as dc
from typing import Any

import numpy as np

VERSION = 2
FINE = "cell"  # the name of the fine level: the classes themselves


class LabelSpaceError(ValueError):
    """A labels dict that is not a usable label space."""


@dc.dataclass
class Level:
    """One coarser H3 level: its cells (with centroid and place), and each fine class's parent index."""
    name: str
    resolution: int
    cells: list[str]
    lat: np.ndarray
    lon: np.ndarray
    places: list[str]
    parent: np.ndarray  # (num_classes,) index into ``cells`` for every fine class

    def __len__(self) -> int:
        return len(self.cells)

    def to_dict(self) -> dict:
        return {"name": self.name, "resolution": self.resolution, "cells": list(self.cells),
                "lat": [round(float(v), 6) for v in self.lat], "lon": [round(float(v), 6) for v in self.lon],
                "places": list(self.places), "parent": [int(p) for p in self.parent]}


@dc.dataclass
class LabelSpace:
    classes: list[dict]
    h3_resolution: int | None
    levels: list[Level] = dc.field(default_factory=list)  # coarser levels, coarse to fine (the fine one is ``classes``)

    # ---- the fine level ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def lat(self) -> np.ndarray:
        return np.array([c["lat"] for c in self.classes], dtype=np.float64)

    @property
    def lon(self) -> np.ndarray:
        return np.array([c["lon"] for c in self.classes], dtype=np.float64)

    @property
    def cells(self) -> list[str]:
        return [c["cell"] for c in self.classes]

    @property
    def places(self) -> list[str]:
        return [c["place"] for c in self.classes]

    @property
    def level_names(self) -> list[str]:
        return [lv.name for lv in self.levels] + [FINE]

    def level(self, name: str) -> Level:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise KeyError(f"no label level {name!r}: this label space has {', '.join(self.level_names)}")

    def same_classes(self, other: "LabelSpace") -> bool:
        """Two models can be combined only over the same classes, in the same order."""
        return self.cells == other.cells

    # ---- building ---------------------------------------------------------------
    @classmethod
    def from_anchors(cls, lat, lon, resolution: int = 1, places: list[str] | None = None) -> "LabelSpace":
        """One class per (lat, lon) anchor, named by its H3 cell at ``resolution`` (tests, benchmarks, toy models)."""
        import h3

        lat, lon = np.asarray(lat, np.float64).ravel(), np.asarray(lon, np.float64).ravel()
        classes = [{"index": i, "cell": h3.latlng_to_cell(float(a), float(o), resolution), "resolution": resolution,
                    "lat": float(a), "lon": float(o), "place": places[i] if places else f"class {i}"}
                   for i, (a, o) in enumerate(zip(lat, lon))]
        return cls(classes, resolution)

    def with_levels(self, resolutions: list[int]) -> "LabelSpace":
        """This space with coarser levels at ``resolutions`` (each below the fine resolution), coarse to fine."""
        import h3

        from .geo import place_names

        fine_res = self.h3_resolution
        levels = []
        for r in sorted(set(int(r) for r in resolutions)):
            if fine_res is None or not 0 <= r < fine_res:
                raise LabelSpaceError(f"a parent level must have an H3 resolution in 0..{(fine_res or 1) - 1}, got {r}")
            parents = [h3.cell_to_parent(c, min(r, h3.get_resolution(c))) for c in self.cells]
            cells = sorted(set(parents))
            where = {c: i for i, c in enumerate(cells)}
            pts = [h3.cell_to_latlng(c) for c in cells]
            lat = np.array([p[0] for p in pts])
            lon = np.array([p[1] for p in pts])
            levels.append(Level(f"r{r}", r, cells, lat, lon, [p["label"] for p in place_names(zip(lat, lon))],
                                np.array([where[p] for p in parents], dtype=np.int64)))
        return LabelSpace(self.classes, self.h3_resolution, levels)

    # ---- (de)serialising -----------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": VERSION, "h3_resolution": self.h3_resolution, "num_classes": self.num_classes,
                "levels": [lv.to_dict() for lv in self.levels], "classes": self.classes}

    @classmethod
    def from_dict(cls, d: Any, where: str = "labels") -> "LabelSpace":
        if isinstance(d, LabelSpace):
            return d
        if not isinstance(d, dict):
            raise LabelSpaceError(f"{where}: not a labels dict")
        version = d.get("version", 1)
        if version not in (1, VERSION):
            raise LabelSpaceError(f"{where}: labels version {version!r}; this geolocate reads versions 1 and {VERSION}")
        classes, n = d.get("classes"), d.get("num_classes")
        if not isinstance(classes, list) or not isinstance(n, int) or len(classes) != n or n < 1:
            raise LabelSpaceError(f"{where}: its labels list {len(classes) if isinstance(classes, list) else 'no'} "
                                  f"classes but declare {n!r}")
        if not all(isinstance(c, dict) and CLASS_KEYS <= c.keys() for c in classes):
            raise LabelSpaceError(f"{where}: a class without {', '.join(sorted(CLASS_KEYS))}")
        levels = []
        for i, lv in enumerate(d.get("levels") or [] if version == VERSION else []):
            try:
                level = Level(str(lv["name"]), int(lv["resolution"]), list(lv["cells"]), np.asarray(lv["lat"], np.float64),
                              np.asarray(lv["lon"], np.float64), list(lv["places"]), np.asarray(lv["parent"], np.int64))
            except (KeyError, TypeError, ValueError) as e:
                raise LabelSpaceError(f"{where}: level {i} is damaged ({type(e).__name__}: {e})") from None
            m = len(level.cells)
            if (len(level.parent) != n or not (len(level.lat) == len(level.lon) == len(level.places) == m)
                    or (n and (level.parent.min() < 0 or level.parent.max() >= m))):
                raise LabelSpaceError(f"{where}: level {level.name!r} does not fit its {n} classes")
            levels.append(level)
        return cls(classes, d.get("h3_resolution"), levels)


CLASS_KEYS = frozenset({"cell", "lat", "lon", "place"})
