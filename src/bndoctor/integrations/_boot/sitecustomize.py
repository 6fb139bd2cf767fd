"""Started by ``bndoctor watch`` in every Python process of the command it runs (this folder is on PYTHONPATH).

It imports nothing heavy: it waits for ``import torch`` and then installs
:mod:`bndoctor.integrations.watch`'s hooks, so processes that never import
torch (a launcher script, a tool) are not slowed down. Then it runs the
``sitecustomize`` this one shadows, if the environment has one.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds ``torch`` as usual, then starts the watcher once torch's module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_torch = spec.loader.exec_module

        def exec_module(module):
            run_torch(module)
            try:
                from bndoctor.integrations.watch import start

                start()
            except Exception as exc:  # the user's training must run even if the watcher cannot
                sys.stderr.write(f"bndoctor watch: monitoring is off in this process: {exc}\n")

        spec.loader.exec_module = exec_module
        return spec


def _chain():
    """Run the environment's own sitecustomize, which this file shadows."""
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == _HERE:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


if os.environ.get("BNDOCTOR_WATCH") and "torch" not in sys.modules:
    sys.meta_path.insert(0, _AfterTorch())
_chain()
