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
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..catalogue import better, metric
from ..geo import geoscore, haversine_km
from ..io import atomic_write, one_line
from ..progress import progress_bar
from .losses import LossContext, class_weights_from_counts
from .sampling import epoch_order, hard_negative_weights


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
    """One split's inputs: features (or image paths for fine-tuning), labels, true positions."""
    labels: torch.Tensor
    lat: torch.Tensor
    lon: torch.Tensor
    feats: torch.Tensor | None = None
    paths: list[str] | None = None

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
        self.ctx = LossContext(self.class_lat, self.class_lon, cw, self.tc.geo_tau_km, self.tc.geo_mix_ce, self.tc.loss,
                               self.tc.level_weight, self.tc.reg_weight, self.tc.contrastive_weight)
        self.ckpt_dir = Path(ckpt_dir)
        self.on_epoch = on_epoch or (lambda row: None)

    # ---- evaluation on a split ------------------------------------------------
    def val_metrics(self, head: nn.Module, out, split: Split) -> dict:
        """Validation numbers of one ``GeoOutput`` on ``split``, through the head's decode (its answer point)."""
        dec = head.decode(out)
        lp = dec.log_probs
        pred = lp.argmax(1)
        if dec.point is not None:
            pt_lat, pt_lon = dec.point[:, 0].double().numpy(), dec.point[:, 1].double().numpy()
        else:
            pt_lat, pt_lon = self.class_lat[pred].numpy(), self.class_lon[pred].numpy()
        d = haversine_km(split.lat.numpy(), split.lon.numpy(), pt_lat, pt_lon)
        top5 = lp.topk(min(5, lp.shape[1]), dim=1).indices
        return {
            "val_loss": float(head.loss(out, split.labels, split.lat, split.lon, self.ctx)),
            "val_top1": float((pred == split.labels).float().mean()),
            "val_top5": float((top5 == split.labels[:, None]).any(1).float().mean()),
            "val_median_km": float(np.median(d)),
            "val_geoscore": geoscore(d),
        }

    # ---- phases ----------------------------------------------------------------
    def fit_head(self, head: nn.Module, train: Split, val: Split, resume: dict | None = None) -> dict:
        def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            g = torch.Generator().manual_seed(self.tc.seed * 1000 + epoch)
            weights = None
            if self.tc.hard_negatives > 0 and epoch > 1:  # the confusions of the head as it enters this epoch
                with torch.no_grad():
                    head.eval()
                    pred = head.decode(head(train.feats)).log_probs.argmax(1).numpy()
                    head.train()
                weights = hard_negative_weights(pred, train.labels.numpy(), self.labels.num_classes, self.tc.hard_negatives)
            perm = epoch_order(len(train), g, weights)
            for s in range(0, len(train), self.tc.batch_size):
                idx = perm[s:s + self.tc.batch_size]
                yield train.feats[idx], idx

        @torch.no_grad()
        def evaluate():
            head.eval()
            return head(val.feats)

        opt = torch.optim.AdamW(head.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        return self._run("frozen", self.tc.epochs, head, head, opt, batches, train, val, evaluate, resume)

    def fit_finetune(self, model: nn.Module, train: Split, val: Split,
                     batch_fn: Callable[[nn.Module, list[str], bool, torch.Generator | None], torch.Tensor],
                     epochs: int, backbone_lr_mult: float, resume: dict | None = None, history: list | None = None,
                     start: dict | None = None) -> dict:
        """Train backbone and head on images.

        ``batch_fn(model, paths, augment, generator)`` returns the preprocessed batch. ``history`` continues the
        frozen phase's; the model as it enters (the frozen phase's ``stopper`` state, ``start``) stays the one to
        beat, so fine-tuning never ships a worse model than the frozen phase made.
        """
        for p in model.backbone.parameters():
            p.requires_grad_(True)

        def batches(epoch: int):
            g = torch.Generator().manual_seed(self.tc.seed * 1000 + 500 + epoch)
            perm = torch.randperm(len(train), generator=g)
            for s in range(0, len(train), self.tc.batch_size):
                idx = perm[s:s + self.tc.batch_size]
                yield batch_fn(model, [train.paths[i] for i in idx], self.tc.augment, g), idx

        @torch.no_grad()
        def evaluate():
            model.eval()
            feats = torch.cat([model.backbone(batch_fn(model, val.paths[s:s + 64], False, None)) for s in range(0, len(val), 64)])
            return model.head(feats)

        opt = torch.optim.AdamW([
            {"params": model.head.parameters(), "lr": self.tc.lr},
            {"params": model.backbone.parameters(), "lr": self.tc.lr * backbone_lr_mult},
        ], weight_decay=self.tc.weight_decay)
        beat = None
        if resume is None and start and start.get("best") is not None:
            beat = (start, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return self._run("finetune", epochs, model, model.head, opt, batches, train, val, evaluate, resume, history, beat)

    def fit_partial(self, model: nn.Module, train_acts, train: Split, val_acts, val: Split, epochs: int, tail_lr_mult: float,
                    resume: dict | None = None, history: list | None = None, start: dict | None = None) -> dict:
        """Train the backbone's tail + head (``training.partial.TailModel``) over cached trunk activations.

        ``train_acts``/``val_acts``: ``training.partial.Rows`` aligned with ``train``/``val`` (labels, positions).
        The tail learns at ``lr * tail_lr_mult``; as in fine-tuning, the model as it enters (``start``: the frozen
        phase's stopper state) stays the one to beat."""
        from .partial import tail_features

        for p in model.parameters():
            p.requires_grad_(True)

        def batches(epoch: int):
            g = torch.Generator().manual_seed(self.tc.seed * 1000 + 700 + epoch)
            perm = torch.randperm(len(train), generator=g)
            for s in range(0, len(train), self.tc.batch_size):
                idx = perm[s:s + self.tc.batch_size]
                yield train_acts.take(idx.numpy()), idx

        @torch.no_grad()
        def evaluate():
            return model.head(tail_features(model, val_acts))

        opt = torch.optim.AdamW([
            {"params": model.head.parameters(), "lr": self.tc.lr},
            {"params": model.tail.parameters(), "lr": self.tc.lr * tail_lr_mult},
        ], weight_decay=self.tc.weight_decay)
        beat = None
        if resume is None and start and start.get("best") is not None:
            beat = (start, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return self._run("partial", epochs, model, model.head, opt, batches, train, val, evaluate, resume, history, beat)

    def _run(self, phase: str, epochs: int, module: nn.Module, head: nn.Module, opt, batches, train: Split, val: Split, evaluate, resume,
             history: list | None = None, start: tuple[dict, dict] | None = None) -> dict:
        """The epoch loop shared by both phases; ``start`` = (stopper state, weights) of a model this phase must beat.

        Returns the state: ``stopper`` (``EarlyStopping`` fields; ``best_row`` is the history row of the weights
        loaded back into ``module``), ``stopped_early``, ``history``.
        """
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
                for x, idx in batches(epoch):
                    loss = head.loss(module(x), train.labels[idx], train.lat[idx], train.lon[idx], self.ctx)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.tc.grad_clip > 0:
                        nn.utils.clip_grad_norm_(module.parameters(), self.tc.grad_clip)
                    opt.step()
                    sched.step()
                    total += loss.item() * len(idx)
                    count += len(idx)
                row = {"epoch": epoch, "phase": phase, "train_loss": total / max(count, 1), **self.val_metrics(head, evaluate(), val),
                       "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 3)}
                state["history"].append(row)
                if stopper.update(row):
                    state["best_state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
                state.update(epoch=epoch, stopper=dc.asdict(stopper))
                save_checkpoint(self.ckpt_dir / "last.pt", {**state, "model": module.state_dict(), "optimizer": opt.state_dict(),
                                                           "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()})
                self.on_epoch(row)
                advance(1, description=f"train ({phase}) val median {metric('median_km').fmt(row['val_median_km'], unit=True)}")
        state["stopper"] = dc.asdict(stopper)
        if state["best_state"] is not None:
            module.load_state_dict(state["best_state"])
        return state
