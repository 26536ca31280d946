"""Lazy package exports (PEP 562): a package names its public objects and the modules that
define them, and each is imported on first use.

``usp --help`` imports no torch, yet ``usp/__init__.py`` and the packages whose torch-free
modules the command line reads (``usp.models``, ``usp.infer``) export torch-built objects. With
these exports, ``import usp.models.llama.presets`` runs ``usp/models/__init__.py`` without
importing ``usp.models.llama.model``, and ``usp.models.Llama`` still works as before.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the module
    that defines it; any other name is tried as a submodule (``usp.batch`` after ``import usp``)."""

    def __getattr__(name: str):
        if name.startswith("__"):  # dunder lookups (copy, pickle, inspect) are not submodules
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise  # the submodule exists but something it imports does not
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
