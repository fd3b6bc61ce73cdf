"""Progress bars for every long job (rich), quiet when not on a terminal or when disabled."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def tagged(tag: str, message: object, style: str = "yellow") -> Text:
    """``tag: message`` with only the tag styled; the message (paths with ``[`` ``]``, errors) is never read as rich markup."""
    return Text.assemble((f"{tag}:", style), " ", str(message))


def enabled() -> bool:
    return os.environ.get("GEOLOCATE_PROGRESS", "1") != "0"


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, description=None)``; draws a bar on stderr."""
    if not enabled():
        yield lambda n=1, description=None: None
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        disable=not sys.stderr.isatty() and os.environ.get("GEOLOCATE_PROGRESS") != "force",
    )
    with prog:
        task = prog.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            kw = {"description": description} if description else {}
            prog.update(task, advance=n, **kw)

        yield advance
    if prog.disable:  # not a terminal: one summary line instead of a bar
        console.print(f"{description}: {prog.tasks[0].completed:.0f}/{total if total is not None else '?'} done", markup=False)
