"""Device and numeric precision of training (``train.device``, ``train.precision``), open_clip style.

- ``train.device``: ``auto`` (CUDA when torch sees one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
- ``train.precision``: ``fp32``; ``bf16`` (autocast to bfloat16, on CPU or CUDA; no loss scaling needed);
  ``fp16`` (autocast to float16 with a ``GradScaler``; CUDA only, since float16 gradients underflow without
  scaling and CPU float16 matmuls are slow).

Weights, optimizer state and checkpoints stay float32 in every mode: only the forward pass is autocast.
"""
from __future__ import annotations

import contextlib
import dataclasses as dc

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(name: str) -> str | None:
    """None when ``name`` is a valid ``train.device`` value, else the one-line reason."""
    base = str(name).split(":")[0]
    if base not in DEVICES or (":" in str(name) and (base != "cuda" or not str(name).split(":", 1)[1].isdigit())):
        return f"train.device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}"
    return None


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for ``train.device``; asking for CUDA on a machine without one is a ValueError."""
    if isinstance(name, torch.device):
        return name
    problem = check_device(name)
    if problem:
        raise ValueError(problem)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name}: torch sees no CUDA device here (torch {torch.__version__}); "
                         "use train.device=cpu or auto")
    return torch.device(name)


@dc.dataclass
class Precision:
    """The autocast context and gradient scaler of one ``train.precision`` on one device."""
    name: str
    device: torch.device

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")
        if self.name == "fp16" and self.device.type != "cuda":
            raise ValueError(f"train.precision=fp16 needs a CUDA device (train.device is {self.device}); "
                             "use bf16 on the CPU")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    @property
    def scaling(self) -> bool:
        return self.scaler.is_enabled()


def get_precision(name: str, device: str | torch.device) -> Precision:
    return Precision(name, resolve_device(device))
