"""The ``bndoctor`` command line. Commands are registered in :mod:`bndoctor.cli._app`."""

from ._app import main

__all__ = ["main"]
