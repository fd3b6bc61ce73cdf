"""The training loop: a head over cached embeddings, then optional fine-tuning.

Phase ``frozen`` trains the head on cached backbone features (fast on CPU).
Phase ``finetune`` (``train.finetune_epochs > 0``) unfreezes the backbone and
trains on images with the backbone at ``lr * finetune_lr_mult``. Phase ``partial``
(``train.partial_blocks > 0``) trains only the backbone's last blocks + the head over
cached trunk activations (``training.partial``), the tail at ``lr * partial_lr_mult``. Both use
AdamW, linear warmup then cosine decay per step, gradient clipping, model
selection and early stopping on one validation signal (``EarlyStopping``),
and a full-state checkpoint after every epoch (``checkpoints/last.pt``) from
which ``resume`` continues exactly.
"""
from __future__ import annotations

import dataclasses as dc
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..catalogue import better, metric
from ..geo import geoscore, haversine_km
from ..io import atomic_write, one_line
from ..progress import progress_bar
from . import distributed as D
from .losses import LossContext, class_neighbours, class_weights_from_counts
from .precision import Precision
from .sampling import epoch_order, hard_negative_weights
from ..models.outputs import GeoOutput


if TYPE_CHECKING:
    from .store import FeatureView


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# validation signals a run can select its epoch on: name (a key of ``Trainer.val_metrics``) -> its catalogue metric
# (which knows the direction); the other keys of a validation row are catalogued too
MONITORS: dict[str, str] = {"val_loss": "loss", "val_median_km": "median_km", "val_geoscore": "geoscore", "val_top1": "top1_acc"}
VAL_ROW_METRICS: dict[str, str] = {**MONITORS, "val_top5": "top5_acc"}


@dc.dataclass
class EarlyStopping:
    """Which epoch to keep and when to stop, from one validation signal.

    The signal is ``row[monitor]`` smoothed by an exponential moving average (``ema`` = weight of the past;
    0 = the raw value). The epoch with the best smoothed signal is the one kept; training stops once it has not
    improved for ``patience`` epochs, but never before ``min_epochs`` epochs ran. Its fields are plain values,
    so ``dc.asdict`` is its checkpoint state. The defaults of a run live in ``cfg.train`` (``early_stopping``).
    """
    monitor: str
    patience: int
    min_epochs: int = 0
    ema: float = 0.0
    smoothed: float | None = None
    best: float | None = None
    best_row: dict | None = None
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        if self.monitor not in MONITORS:
            raise ValueError(f"train.monitor must be one of {sorted(MONITORS)}, got {self.monitor!r}")

    def better(self, new: float, old: float | None) -> bool:
        return old is None or better(MONITORS[self.monitor], new, old, tol=1e-9)

    def update(self, row: dict) -> bool:
        """Take one epoch's validation row; True when it is the new best (the weights to keep)."""
        value = float(row[self.monitor])
        self.smoothed = value if self.smoothed is None else self.ema * self.smoothed + (1 - self.ema) * value
        if self.better(self.smoothed, self.best):
            self.best, self.best_row, self.bad_epochs = self.smoothed, dict(row), 0
            return True
        self.bad_epochs += 1
        return False

    def should_stop(self, epochs_done: int) -> bool:
        return self.bad_epochs >= self.patience and epochs_done >= self.min_epochs


def early_stopping(tc) -> EarlyStopping:
    """A fresh ``EarlyStopping`` from ``cfg.train``."""
    return EarlyStopping(tc.monitor, tc.patience, tc.min_epochs, tc.monitor_ema)


@dc.dataclass
class Split:
    """One split's inputs: features (or image paths for fine-tuning), labels, true positions.

    Single-view samples: ``feats`` (N, F). Multi-view samples: ``feats`` (N, V, F) and ``view_mask`` (N, V); the
    frozen phase then trains a fusion with the head, over DataLoaders of a ``FeatureDataset``."""
    labels: torch.Tensor
    lat: torch.Tensor
    lon: torch.Tensor
    feats: "torch.Tensor | FeatureView | None" = None   # a FeatureView: rows of the memory-mapped store, read per batch
    paths: list[str] | None = None
    view_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p), suffix=".pt")


CHECKPOINT_KEYS = ("phase", "epoch", "stopped_early", "stopper", "history", "best_state",
                   "model", "optimizer", "scheduler", "torch_rng")


def load_checkpoint(path: str | Path) -> dict:
    """A full-state checkpoint; any unreadable or incomplete file is a ValueError with one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated, corrupt or foreign file
        raise ValueError(f"{path}: not a loadable training checkpoint ({one_line(e)}); start a new run instead") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: an incomplete training checkpoint (no {', '.join(missing)}); start a new run instead")
    return state


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def feature_rows(feats, idx=None) -> torch.Tensor:
    """float32 rows ``idx`` (all when None) of a tensor or a :class:`~geolocate.training.store.FeatureView`."""
    if isinstance(feats, torch.Tensor):
        return feats if idx is None else feats[idx]
    return torch.from_numpy(feats.rows(slice(None) if idx is None else idx))


def _ctx_on(ctx: LossContext, device: torch.device) -> LossContext:
    return ctx if device.type == "cpu" else ctx.to(device)


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.float().cpu()


class Trainer:
    """Trains a registered head (frozen phase) or backbone + head (fine-tuning) on one label space; every loss and
    validation number goes through the head's own ``loss`` and ``decode``."""

    def __init__(self, cfg, labels, train_counts: np.ndarray, ckpt_dir: Path, on_epoch: Callable[[dict], None] | None = None):
        from ..labels import LabelSpace

        self.cfg = cfg
        self.tc = cfg.train
        self.labels = LabelSpace.from_dict(labels)
        self.class_lat = torch.as_tensor(self.labels.lat, dtype=torch.float64)
        self.class_lon = torch.as_tensor(self.labels.lon, dtype=torch.float64)
        cw = class_weights_from_counts(torch.as_tensor(train_counts)) if self.tc.class_weights else None
        nb = class_neighbours(self.labels) if self.tc.loss == "adjacency" else None
        self.ctx = LossContext(self.class_lat, self.class_lon, cw, self.tc.geo_tau_km, self.tc.geo_mix_ce, self.tc.loss,
                               self.tc.level_weight, self.tc.reg_weight, self.tc.contrastive_weight, nb, self.tc.adjacency_eps)
        self.ckpt_dir = Path(ckpt_dir)
        self.on_epoch = on_epoch or (lambda row: None)
        # device, precision and data parallelism (training/precision.py, training/distributed.py)
        self.dist = D.current()
        self.device = D.device_for(self.tc.device, self.dist)
        self.precision = Precision(self.tc.precision, self.device)
        self.train_ctx = _ctx_on(self.ctx, self.device)

    # ---- evaluation on a split ------------------------------------------------
    def val_metrics(self, head: nn.Module, out, split: Split) -> dict:
        """Validation numbers of one ``GeoOutput`` on ``split``, through the head's decode (its answer point), on the
        head's device."""
        dev = next(head.parameters()).device
        out = out.map(lambda t: t.to(dev))
        dec = head.decode(out)
        lp = dec.log_probs.float().cpu()
        pred = lp.argmax(1)
        if dec.point is not None:
            pt_lat, pt_lon = dec.point[:, 0].double().cpu().numpy(), dec.point[:, 1].double().cpu().numpy()
        else:
            pt_lat, pt_lon = self.class_lat[pred].numpy(), self.class_lon[pred].numpy()
        d = haversine_km(split.lat.numpy(), split.lon.numpy(), pt_lat, pt_lon)
        top5 = lp.topk(min(5, lp.shape[1]), dim=1).indices
        y, la, lo = (t.to(dev) for t in (split.labels, split.lat, split.lon))
        return {
            "val_loss": float(head.loss(out, y, la, lo, self.ctx if dev.type == "cpu" else self.train_ctx)),
            "val_top1": float((pred == split.labels).float().mean()),
            "val_top5": float((top5 == split.labels[:, None]).any(1).float().mean()),
            "val_median_km": float(np.median(d)),
            "val_geoscore": geoscore(d),
        }

    # ---- phases ----------------------------------------------------------------
    def fit_head(self, head: nn.Module, train: Split, val: Split, resume: dict | None = None, fusion: nn.Module | None = None) -> dict:
        """Train ``head`` on cached features; with ``fusion`` (multi-view splits) the fusion and the head together,
        batches coming from DataLoaders over ``FeatureDataset`` s (same order and seeds as the single-view path)."""
        from ..models.fusion import FusedHead
        from .dataset import FeatureDataset, feature_loader

        if (train.view_mask is not None) != (fusion is not None):
            raise ValueError("multi-view splits (feats (N, V, F) with a view mask) train with a fusion, and only they do")
        module = head if fusion is None else FusedHead(fusion, head)
        train_ds = FeatureDataset.of_split(train) if fusion is not None else None

        def batches(epoch: int) -> Iterator[tuple[torch.Tensor | tuple, torch.Tensor, int]]:  # (x, this rank's rows, global batch size)
            g = torch.Generator().manual_seed(self.tc.seed * 1000 + epoch)
            weights = None
            if self.tc.hard_negatives > 0 and epoch > 1:  # the confusions of the head as it enters this epoch
                with torch.no_grad():
                    module.eval()
                    pred = torch.cat([head.decode(out).log_probs.argmax(1).cpu() for out in self.outputs(module, train)]).numpy()
                    module.train()
                weights = hard_negative_weights(pred, train.labels.numpy(), self.labels.num_classes, self.tc.hard_negatives)
            perm = epoch_order(len(train), g, weights)
            chunks = [perm[s:s + self.tc.batch_size] for s in range(0, len(train), self.tc.batch_size)]
            shards = [D.shard(batch, self.dist) for batch in chunks]  # this rank's share of each global batch
            if train_ds is None:
                for batch, idx in zip(chunks, shards):
                    yield feature_rows(train.feats, idx).to(self.device, non_blocking=True), idx, len(batch)
            else:
                for batch, idx, b in zip(chunks, shards, feature_loader(train_ds, shards)):
                    yield (b["features"].to(self.device, non_blocking=True), b["view_mask"].to(self.device)), idx, len(batch)

        @torch.no_grad()
        def evaluate():
            module.eval()
            with self.precision.autocast():
                return GeoOutput.cat([out.map(_to_cpu) for out in self.outputs(module, val)])

        opt = torch.optim.AdamW(module.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        return self._run("frozen", self.tc.epochs, module, head, opt, batches, train, val, evaluate, resume)

    EVAL_ROWS = 65536       # rows per forward pass over a whole single-view split
    EVAL_SAMPLES = 4096     # multi-view samples per batch of the evaluation DataLoader

    def outputs(self, module: nn.Module, split: Split) -> Iterator[GeoOutput]:
        """``module``'s outputs (on the training device) over a whole split, batch by batch: chunks of its features
        (single view), or a DataLoader over its ``FeatureDataset`` (multi-view)."""
        from .dataset import FeatureDataset, feature_loader, sequential_batches

        if split.view_mask is None:
            for s in range(0, len(split), self.EVAL_ROWS):
                yield module(feature_rows(split.feats, torch.arange(s, min(s + self.EVAL_ROWS, len(split)))).to(self.device))
            return
        for b in feature_loader(FeatureDataset.of_split(split), sequential_batches(len(split), self.EVAL_SAMPLES)):
            yield module(b["features"].to(self.device), b["view_mask"].to(self.device))

    def fit_finetune(self, model: nn.Module, train: Split, val: Split,
                     batch_fn: Callable[[nn.Module, list[str], bool, torch.Generator | None], torch.Tensor],
                     epochs: int, backbone_lr_mult: float, resume: dict | None = None, history: list | None = None,
                     start: dict | None = None) -> dict:
        """Train backbone and head on images.

        ``batch_fn(model, paths, augment, generator)`` returns the preprocessed batch. ``history`` continues the
        frozen phase's; the model as it enters (the frozen phase's ``stopper`` state, ``start``) stays the one to
        beat, so fine-tuning never ships a worse model than the frozen phase made.
        """
        def images(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return batch_fn(model, [train.paths[i] for i in idx], self.tc.augment, g).to(self.device)

        @torch.no_grad()
        def evaluate():
            model.eval()
            with self.precision.autocast():
                return GeoOutput.cat([model(batch_fn(model, val.paths[s:s + 64], False, None).to(self.device)).map(_to_cpu)
                                      for s in range(0, len(val), 64)])

        return self._fit_body("finetune", 500, model, model.backbone, backbone_lr_mult, images, train, val, evaluate, epochs,
                              resume, history, start)

    def fit_partial(self, model: nn.Module, train_acts, train: Split, val_acts, val: Split, epochs: int, tail_lr_mult: float,
                    resume: dict | None = None, history: list | None = None, start: dict | None = None) -> dict:
        """Train the backbone's tail + head (``training.partial.TailModel``) over cached trunk activations.

        ``train_acts``/``val_acts``: ``training.partial.Rows`` aligned with ``train``/``val`` (labels, positions).
        The tail learns at ``lr * tail_lr_mult``; as in fine-tuning, the model as it enters (``start``: the frozen
        phase's stopper state) stays the one to beat."""
        from .partial import tail_features

        def activations(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return train_acts.take(idx.numpy()).to(self.device)

        @torch.no_grad()
        def evaluate():
            model.to("cpu")
            try:
                return model.head(tail_features(model, val_acts)).map(_to_cpu)
            finally:
                model.to(self.device)

        return self._fit_body("partial", 700, model, model.tail, tail_lr_mult, activations, train, val, evaluate, epochs,
                              resume, history, start)

    def _fit_body(self, phase: str, seed_offset: int, model: nn.Module, body: nn.Module, body_lr_mult: float, inputs,
                  train: Split, val: Split, evaluate, epochs: int, resume, history, start) -> dict:
        """A phase that trains part of the backbone (``body``, at ``lr * body_lr_mult``) with the head: fine-tuning and
        partial fine-tuning. ``inputs(rows, generator)`` gives a batch's input; each epoch shuffles with its own seed
        (``seed_offset`` keeps the phases apart), each rank takes its share of every global batch. The model as it
        enters (``start``: the previous phase's stopper state) stays the one to beat."""
        for p in body.parameters():
            p.requires_grad_(True)

        def batches(epoch: int):
            g = torch.Generator().manual_seed(self.tc.seed * 1000 + seed_offset + epoch)
            perm = torch.randperm(len(train), generator=g)
            for s in range(0, len(train), self.tc.batch_size):
                batch = perm[s:s + self.tc.batch_size]
                idx = D.shard(batch, self.dist)  # this rank's share of the global batch
                yield inputs(idx, g) if len(idx) else None, idx, len(batch)

        opt = torch.optim.AdamW([
            {"params": model.head.parameters(), "lr": self.tc.lr},
            {"params": body.parameters(), "lr": self.tc.lr * body_lr_mult},
        ], weight_decay=self.tc.weight_decay)
        beat = None
        if resume is None and start and start.get("best") is not None:
            beat = (start, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return self._run(phase, epochs, model, model.head, opt, batches, train, val, evaluate, resume, history, beat)

    def _run(self, phase: str, epochs: int, module: nn.Module, head: nn.Module, opt, batches, train: Split, val: Split, evaluate, resume,
             history: list | None = None, start: tuple[dict, dict] | None = None) -> dict:
        """The epoch loop shared by both phases; ``start`` = (stopper state, weights) of a model this phase must beat.

        Returns the state: ``stopper`` (``EarlyStopping`` fields; ``best_row`` is the history row of the weights
        loaded back into ``module``), ``stopped_early``, ``history``.
        """
        module.to(self.device)
        main = self.dist.is_main
        scaler = self.precision.scaler
        steps_per_epoch = max(1, math.ceil(len(train) / self.tc.batch_size))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * steps_per_epoch, self.tc.warmup_epochs * steps_per_epoch))
        stopper = early_stopping(self.tc)
        state = {"phase": phase, "epoch": 0, "stopped_early": False, "history": list(history or []), "best_state": None}
        if start is not None:
            # the model to beat: its best signal and row; patience and smoothing start afresh in this phase
            stopper.best, stopper.best_row = start[0]["best"], start[0]["best_row"]
            state["best_state"] = start[1]
        if resume and resume.get("phase") == phase:
            try:
                module.load_state_dict(resume["model"])
                opt.load_state_dict(resume["optimizer"])
                sched.load_state_dict(resume["scheduler"])
                state.update({k: resume[k] for k in ("epoch", "stopped_early", "history", "best_state")})
                stopper = EarlyStopping(**resume["stopper"])
                torch.set_rng_state(resume["torch_rng"])
            except (RuntimeError, KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{self.ckpt_dir / 'last.pt'}: does not fit this run's model or recipe ({one_line(e)}); "
                                 "start a new run instead") from None
        with progress_bar(f"train ({phase})", epochs) as advance:
            advance(state["epoch"])
            for epoch in range(state["epoch"] + 1, epochs + 1):
                if stopper.should_stop(epoch - 1):
                    state["stopped_early"] = True
                    break
                t0 = time.time()
                module.train()
                total, count = 0.0, 0
                for x, idx, n_batch in batches(epoch):
                    opt.zero_grad(set_to_none=True)
                    if len(idx):
                        y, la, lo = (t[idx].to(self.device) for t in (train.labels, train.lat, train.lon))
                        with self.precision.autocast():
                            loss = head.loss(module(*x) if isinstance(x, tuple) else module(x), y, la, lo, self.train_ctx)
                        # this rank's share of the global batch mean; the shares' gradients are summed over ranks
                        scaler.scale(loss * (len(idx) / n_batch) if self.dist.enabled else loss).backward()
                        total += loss.item() * len(idx)
                        count += len(idx)
                    D.all_reduce_grads(module.parameters(), self.dist)
                    scaler.unscale_(opt)
                    if self.tc.grad_clip > 0:
                        nn.utils.clip_grad_norm_(module.parameters(), self.tc.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                total, count = D.all_reduce_sum([total, count], self.dist)
                D.broadcast_buffers(module, self.dist)
                row = {"epoch": epoch, "phase": phase, "train_loss": total / max(count, 1), **self.val_metrics(head, evaluate(), val),
                       "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 3)}
                row = D.broadcast_object(row, self.dist)  # one decision on every rank
                state["history"].append(row)
                if stopper.update(row):
                    state["best_state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
                state.update(epoch=epoch, stopper=dc.asdict(stopper))
                if main:  # rank 0 writes
                    save_checkpoint(self.ckpt_dir / "last.pt", {**state, "model": module.state_dict(), "optimizer": opt.state_dict(),
                                                               "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()})
                    self.on_epoch(row)
                advance(1, description=f"train ({phase}) val median {metric('median_km').fmt(row['val_median_km'], unit=True)}")
        state["stopper"] = dc.asdict(stopper)
        if state["best_state"] is not None:
            module.load_state_dict(state["best_state"])
        module.to("cpu")
        return state
