"""The model families usp knows, and which one a run's settings or a built model belong to.

The two built-in families are named by import path and imported the first time the registry is
asked (:data:`BUILT_IN`); the families import this module, never the reverse. :func:`register`
adds another family (``docs/models.md``).

An entry imports neither torch nor its family's libraries: choosing a family and checking a
run's model settings against it costs no import (``usp generate`` answers bad input before
torch loads; transformers is optional, and a Llama run never imports it). :func:`lazy` is how
an entry names its other parts: a function in a module that needs torch or an optional library,
or that lives in a higher layer (an inference adapter, in ``usp.infer``), imported when first
called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from usp.models.family import ModelFamily, ModelSettings

# "module:attribute" of each built-in family's entry, in the order their claims are asked
BUILT_IN = ("usp.models.llama.family:LLAMA", "usp.integrations.hf_family.family:HUGGING_FACE")

_families: dict[str, ModelFamily] = {}


def resolve(path: str):
    """The object ``"package.module:attribute.attribute"`` names, its module imported."""
    module_name, _, attributes = path.partition(":")
    value = importlib.import_module(module_name)
    for attribute in attributes.split("."):
        value = getattr(value, attribute)
    return value


def lazy(path: str) -> Callable:
    """A function that calls the function ``path`` names (:func:`resolve`), importing its module
    at the first call rather than now."""

    def call(*args, **kwargs):
        return resolve(path)(*args, **kwargs)

    call.__name__ = call.__qualname__ = path.rpartition(".")[2].rpartition(":")[2]
    call.__doc__ = f"{path}, imported when first called."
    return call


def register(family: ModelFamily) -> None:
    """Add ``family`` to the registry; ValueError if another family has its name."""
    _load_built_in()
    if family.name in _families:
        raise ValueError(f"a model family named {family.name!r} is registered already")
    _families[family.name] = family


def families() -> list[ModelFamily]:
    """Every registered family, the built-in ones first."""
    _load_built_in()
    return list(_families.values())


def family_of(settings: ModelSettings) -> ModelFamily:
    """The one family that claims ``settings``; ValueError when none or several do."""
    claiming = [family for family in families() if family.claims(settings)]
    if len(claiming) != 1:
        names = ", ".join(family.name for family in claiming) or "none"
        raise ValueError(f"{settings} must name a model of exactly one model family; claimed "
                         f"by: {names} (registered: {', '.join(_families)})")
    return claiming[0]


def family_of_model(model) -> ModelFamily:
    """The family of a model it built (its ``family`` attribute, kept by parallelize, FSDP2 and
    pipeline stages); ValueError for a model of no registered family."""
    name = getattr(model, "family", None)
    families()
    family = _families.get(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(
            f"{type(model).__name__} belongs to no registered model family (its .family is "
            f"{name!r}; registered: {', '.join(_families)}); usp parallelises the models of "
            "its families (usp.models.registry)"
        )
    return family


def _load_built_in() -> None:
    if not _families:
        for path in BUILT_IN:
            family = resolve(path)
            _families[family.name] = family
