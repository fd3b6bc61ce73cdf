"""Named registries (timm-style): a decorator registers a class under a name; unknown names list the known ones."""
from __future__ import annotations

from typing import Callable


class Registry(dict):
    """``name -> class``; ``what`` names the kind in errors ("head", "fusion", ...)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in self:
                raise ValueError(f"{self.what} {name!r} registered twice")
            cls.name = name
            self[name] = cls
            return cls
        return deco

    def names(self) -> list[str]:
        return sorted(self)

    def get_class(self, name: str) -> type:
        if name not in self:
            raise KeyError(f"unknown {self.what} {name!r}: choose one of {', '.join(self.names())}")
        return self[name]
