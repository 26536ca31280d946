"""``usp train``'s flags, made from the run spec's fields (:mod:`usp.spec`): one flag per field,
named after it (``seq_len`` -> ``--seq-len``), typed by it, with its help text and default.

The flags carry no argparse defaults (the parser is built with ``argument_default=SUPPRESS``):
the namespace holds only what the user typed, so a resumed run takes the rest from its
config.json and a ``--config`` file from the file. Torch-free, like every parser of ``usp``.
"""

from __future__ import annotations

import dataclasses
import typing

from usp.spec import SECTIONS, TOP_LEVEL, RunSpec, field_types


def _choices(metadata: dict):
    if metadata.get("choices_from") == "models":
        from usp.models.llama.presets import CONFIGS  # torch-free: the presets' names

        return sorted(CONFIGS)
    return metadata.get("choices")


def _base_type(hint):
    """``int`` of ``int``, ``str`` of ``str | None``, ``float`` of ``float | None``."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    return arguments[0] if arguments else hint


def _default_text(value) -> str:
    if value is False:
        return "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def spec_fields():
    """``(field, its default)`` for every setting, section by section, then the top level."""
    defaults = RunSpec().flat()
    for kind in SECTIONS.values():
        for item in dataclasses.fields(kind):
            yield item, defaults[item.name]
    for item in dataclasses.fields(RunSpec):
        if item.name in TOP_LEVEL:
            yield item, defaults[item.name]


def add_spec_arguments(parser) -> None:
    """A flag for every field of the run spec."""
    hints = field_types()
    groups = {}
    for item, default in spec_fields():
        metadata = dict(item.metadata)
        flag = metadata.pop("flag", "--" + item.name.replace("_", "-"))
        text = metadata.pop("help")
        group = metadata.pop("group", None)
        metadata.pop("choices_from", None)
        options = {"dest": item.name, "help": text}
        hint = _base_type(hints[item.name])
        if hint is bool:
            options["action"] = "store_false" if default else "store_true"
        else:
            if typing.get_origin(hint) is list:
                hint = typing.get_args(hint)[0]
            options["type"] = hint
            options.update({k: v for k, v in metadata.items() if k in ("nargs", "const",
                                                                      "metavar")})
            choices = _choices(item.metadata)
            if choices:
                options["choices"] = choices
        if "default" not in text:
            options["help"] = f"{text} (default {_default_text(default)})"
        target = parser
        if group is not None:
            if group not in groups:  # one group for all its fields
                groups[group] = parser.add_mutually_exclusive_group()
            target = groups[group]
        target.add_argument(flag, **options)


def given_settings(args) -> dict:
    """The settings the user typed: ``{field: value}`` of the flags present in ``args``."""
    return {item.name: getattr(args, item.name) for item, _ in spec_fields()
            if hasattr(args, item.name)}
