"""The ``geolocate`` command line: one app, subcommands registered per area.

Each module in this package defines ``register(app)``; add a module to
``_MODULES`` to add its commands.
"""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Predict where a photo was taken: build data, train, evaluate, predict, serve.")

_MODULES = ["data", "train", "predict", "mapillary", "runs", "serve"]

for _name in _MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)
