"""Shared CLI plumbing: config options, one-line errors."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console

from ..config import Config, ConfigError
from ..progress import tagged

err_console = Console(stderr=True)
out_console = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML/TOML config file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override: section.key=value (repeatable)")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear error line and exit."""
    err_console.print(tagged("error", message, "bold red"), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def load_config(config: Path | None, overrides: list[str] | None) -> Config:
    try:
        return Config.load(config, overrides or [])
    except ConfigError as e:
        fail(str(e))
