"""How every ``usp`` parser prints its help: descriptions wrapped by paragraph, indented example
lines kept as written, and each flag's default after its text unless the text already states it."""

from __future__ import annotations

import argparse
import textwrap


def shown_default(default) -> str:
    """A default as the user would type it: lists and tuples space-separated."""
    if isinstance(default, (list, tuple)):
        return " ".join(str(item) for item in default)
    return str(default)


def has_default(action: argparse.Action) -> bool:
    """Whether ``action``'s default is a value worth stating (not absent, not a switch's off)."""
    default = action.default
    if default is None or default is argparse.SUPPRESS or isinstance(default, bool):
        return False
    if default == "":
        return False
    return not (isinstance(default, (list, tuple)) and not default)


class HelpFormatter(argparse.HelpFormatter):
    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in textwrap.dedent(text).strip().split("\n\n"):
            if paragraph.startswith(" "):  # an example: its lines stay as written
                paragraphs.append(textwrap.indent(paragraph, indent))
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width,
                                                initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if has_default(action) and "default" not in text and action.option_strings:
            # argparse %-formats help strings: a literal % in a default must be doubled
            text += f" (default: {shown_default(action.default).replace('%', '%%')})"
        return text


def add_parser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """``subparsers.add_parser`` with usp's help formatter."""
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)
