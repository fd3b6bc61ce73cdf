"""The ``geolocate`` command line: one app, subcommands registered per area.

Each module in this package defines ``register(app)``; add a module to
``_MODULES`` to add its commands.
"""
from __future__ import annotations

import importlib

import typer
from typer.core import TyperOption

_display_type_rich = TyperOption.display_type_rich


def _flag_without_type(self: TyperOption, ctx) -> str | None:
    """Flags (``--json``, ``--help``) take no value: show no ``<bool>`` tag for them in --help."""
    return None if self.is_flag else _display_type_rich(self, ctx)


TyperOption.display_type_rich = _flag_without_type  # type: ignore[method-assign]

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Predict where a photo was taken: build data, train, evaluate, predict, serve.")

_MODULES = ["data", "train", "predict", "mapillary", "runs", "serve"]

for _name in _MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)
