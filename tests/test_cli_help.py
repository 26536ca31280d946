"""The ``usp`` command answers ``--help`` and argument errors without importing torch, and every
flag of every subcommand says what it does and what its default is.

Every subcommand is found by walking the parser ``usp.cli.build_parser`` builds, so a subcommand
added later is covered without editing this file. The import checks run in fresh interpreters
(this test process has torch loaded already).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from usp.cli import build_parser
from usp.cli.help import HelpFormatter, has_default, shown_default
from usp.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
# top-level packages that `usp --help` must not import: each costs seconds to load
HEAVY = {"torch", "numpy", "transformers", "diffusers", "safetensors", "matplotlib"}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path of subcommand names, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _walk(subparser, (*path, name))


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level packages a ``python -X importtime`` run imported."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            module = line.rsplit("|", 1)[1].strip()
            if module and module != "imported package":
                names.add(module.split(".")[0])
    return names


COMMANDS = [path for path, _ in _walk(build_parser())]


def test_the_walk_finds_every_subcommand():
    # a floor, not the list: subcommands added later are walked too
    assert {(), ("train",), ("generate",), ("plan",), ("bench",), ("bench", "attention"),
            ("bench", "train"), ("bench", "decode"), ("bench", "plan")} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda path: " ".join(("usp", *path)))
def test_help_imports_no_torch(command):
    result = _run("-X", "importtime", "-m", "usp", *command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: usp")
    assert not _imported(result.stderr) & HEAVY, sorted(_imported(result.stderr) & HEAVY)


@pytest.mark.parametrize("arguments", [["train", "--no-such-flag"], ["plan", "--top", "ten"],
                                       ["bench", "decode", "--layout", "diagonal"]],
                         ids=" ".join)
def test_argument_errors_import_no_torch(arguments):
    result = _run("-X", "importtime", "-m", "usp", *arguments)
    assert result.returncode == 2
    assert "error:" in result.stderr
    assert not _imported(result.stderr) & HEAVY, sorted(_imported(result.stderr) & HEAVY)


def test_building_and_parsing_every_help_leaves_torch_unimported():
    script = """
import contextlib, io, json, sys
from usp.cli import build_parser
parser = build_parser()
from tests.test_cli_help import COMMANDS
for command in COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        parser.parse_args([*command, "--help"])
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""
    result = _run("-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_import_usp_is_lazy_and_exports_the_same_names():
    script = """
import sys
import usp
assert "torch" not in sys.modules, "import usp imported torch"
names = sorted(usp.__all__)
assert names == sorted(["AttentionMask", "LAYOUTS", "CommStats", "Topology", "USPAttention", "joint_attention",
    "parallelize", "ring_attention", "sequence_positions", "shard_sequence", "ulysses_attention",
    "unshard_sequence", "usp_attention"]), names
from usp import *  # noqa: F403
assert callable(usp.usp_attention) and "torch" in sys.modules
assert usp.LAYOUTS == ("contiguous", "zigzag", "stripe")
assert usp.AttentionMask.build(8, causal=True).seq_len == 8
assert callable(usp.batch.shard_batch)  # submodules load on first use, as before
from usp.models import Llama, get_config
from usp.infer import generate
try:
    usp.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("usp.no_such_name did not raise AttributeError")
print("ok")
"""
    result = _run("-c", script)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)


def _stated_default(path: tuple[str, ...], action: argparse.Action):
    """The default a user gets for ``action``: argparse's, or for ``usp train`` (whose parser
    suppresses them so that a resume reads its config.json) the run spec's field's."""
    if path == ("train",) and action.default is argparse.SUPPRESS:
        defaults = RunSpec().flat()
        probe = argparse.Action(option_strings=action.option_strings, dest=action.dest,
                                default=defaults.get(action.dest))
        return probe if has_default(probe) else None
    return action if has_default(action) else None


@pytest.mark.parametrize("command", COMMANDS, ids=lambda path: " ".join(("usp", *path)))
def test_every_flag_has_help_stating_its_default(command):
    parser = dict(_walk(build_parser()))[command]
    assert parser.formatter_class is HelpFormatter
    missing, undated = [], []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help is argparse.SUPPRESS:
            missing.append(name)
            continue
        with_default = _stated_default(command, action)
        text = _help_text(parser, action)
        if with_default is not None and (
                "default" not in text or shown_default(with_default.default) not in text):
            undated.append(f"{name}: {text!r} (default {shown_default(with_default.default)})")
    assert not missing, f"flags without help: {missing}"
    assert not undated, "help that does not state the default:\n" + "\n".join(undated)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda path: " ".join(("usp", *path)))
def test_help_shows_no_markup(command):
    text = dict(_walk(build_parser()))[command].format_help()
    assert "``" not in text, text
