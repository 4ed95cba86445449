"""Adapters to other libraries, each imported only when its library is installed and in use.

- :mod:`rednet.integrations.timm`: RedNet-18 to 152 in timm's model registry;
- :mod:`rednet.integrations.submitit`: ranks, preemption and requeue for the jobs that Hydra's submitit launcher runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Calls ``callback()`` once the top-level module ``name`` is imported: now if it already is,
    otherwise right after its import. Nothing is imported here, so an unused library costs nothing."""
    if name in sys.modules:
        _call(name, callback)
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _call(name: str, callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception as e:  # noqa: BLE001  (the library itself must stay importable)
        warnings.warn(f"rednet could not register with {name}: {e!r}", stacklevel=3)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` through the other finders and runs ``callback`` after its module has executed."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback, self.searching = name, callback, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self.searching:
            return None
        self.searching = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.searching = False
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _call(self.name, self.callback)

        # A spec may be asked for without an import (importlib.util.find_spec): the hook stays
        # in place until a module is actually executed.
        spec.loader.exec_module = exec_module
        return spec
