"""`usp check`: its cases, its reference, and that it fails when the attention is wrong.

The command runs once end to end (four gloo ranks through the elastic launcher, as a user runs
it). The rest drive the library's entry point: in one world of four spawned ranks, a reference
that raises on one rank (every rank must fail that case and go on) and a ring step made to drop
work (only the multi-rank path is wrong: exactly the ring cases must fail); and in one process
with sliding windows dropped from every mask (the single-device path is wrong too: the check's
own reference must catch it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import usp.mask
import usp.schedule
from usp import cli
from usp.check import MASKS, CheckSettings, draw_cases, run_check
from usp.check.cases import factorisations
from usp.check.reference import dense_visible
from usp.layout import LAYOUTS
from usp.mask import AttentionMask
from tests.distributed import run_on_ranks

REPO = Path(__file__).resolve().parents[1]


def test_the_cases_are_seeded_and_cover_every_feature_early():
    cases = draw_cases(40, 4, "cpu", seed=3)
    assert cases == draw_cases(40, 4, "cpu", seed=3)
    assert cases != draw_cases(40, 4, "cpu", seed=4)
    first = cases[:len(factorisations(4))]
    assert {(c.ring, c.ulysses) for c in first} == set(factorisations(4))
    assert {(c.ring, c.ulysses, c.dp) for c in cases} >= {(1, 1, 4), (2, 2, 1), (1, 2, 2)}
    assert {c.layout for c in cases[:len(LAYOUTS)]} == set(LAYOUTS)
    assert {c.mask for c in cases[:len(MASKS)]} == set(MASKS)
    assert {c.placement for c in cases} == {"head-first", "context-first"}
    assert any(c.slots != c.seq_len for c in cases)  # the padding path of uneven lengths
    assert any(c.kv_heads < c.ulysses for c in cases)  # kv heads replicated over Ulysses
    assert any(c.heads % c.ulysses for c in cases)  # heads padded for Ulysses
    assert any(c.kv_heads == 1 < c.heads for c in cases)  # MQA
    assert any(1 < c.kv_heads < c.heads for c in cases)  # GQA
    assert any(c.documents and len(c.documents) > 1 for c in cases)  # documents per batch row
    assert {c.causal for c in cases[:2]} == {True, False}


def test_the_reference_mask_agrees_with_usp_mask_on_every_drawn_case():
    for case in draw_cases(60, 4, "cpu", seed=5):
        arguments = case.mask_arguments()
        arguments.pop("seq_len")
        mask = AttentionMask.build(case.seq_len, causal=case.causal, **arguments)
        mine = dense_visible(case.token_ids(), case.causal, case.window)
        for row in range(mask.batch_rows):
            assert torch.equal(mask.visible(row), mine[row % mine.shape[0]]), case


def test_the_time_budget_stops_after_the_first_case():
    report = run_check(CheckSettings(seconds=1e-3, dtypes=("fp64", "fp32")))
    assert [row["dtype"] for row in report.rows] == ["fp64", "fp32"]
    assert not report.failures, report.failures


def test_usp_check_on_four_ranks_prints_the_table_and_verdict(tmp_path):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    table = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, "-m", "usp", "check", "--nproc", "4", "--cases", "6", "--time", "600",
         "--seed", "1", "--json", str(table)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
        timeout=400,  # a hang guard only
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^#\s+ring\s+uly\s+dp\s+layout\s+dtype", done.stdout, re.MULTILINE)
    assert re.search(r"usp check: 12/12 checks passed \(6 cases x fp32, bf16\) on 4 ranks "
                     r"\(cpu, gloo\) in \d+ s", done.stdout), done.stdout[-2000:]
    rows = json.loads(table.read_text())["rows"]
    assert len(rows) == 12 and all(row["ok"] for row in rows)
    assert {(row["ring"], row["ulysses"]) for row in rows} == set(factorisations(4))


def _two_faults(rank, world_size):
    """In one world: the first reference on rank 1 raises (the others must not wait for it);
    then the last piece of every multi-rank ring schedule is dropped."""
    import usp.check.runner as runner

    original, calls = runner.dense_attention, []

    def failing_once(*args):
        calls.append(1)
        if rank == 1 and len(calls) == 1:
            raise RuntimeError("out of memory (on purpose)")
        return original(*args)

    runner.dense_attention = failing_once
    failed_reference = run_check(CheckSettings(seconds=600, max_cases=3, seed=2,
                                               dtypes=("fp32",)))
    runner.dense_attention = original

    pieces = usp.schedule.RingSchedule.pieces

    def fewer_pieces(self, ring_rank, source):
        found = pieces(self, ring_rank, source)
        return found[:-1] if self.ring_size > 1 else found

    usp.schedule.RingSchedule.pieces = fewer_pieces
    broken_ring = run_check(CheckSettings(seconds=600, max_cases=6, seed=2,
                                          dtypes=("fp32", "bf16")))
    return failed_reference, broken_ring


@pytest.fixture(scope="module")
def two_faults():
    return run_on_ranks(_two_faults, 4, timeout_s=300)


def test_a_reference_failing_on_one_rank_fails_its_case_on_every_rank_without_a_hang(two_faults):
    for report, _ in two_faults:  # the same verdict on every rank
        assert report.rows[0]["ring"] == 4  # a collective case: the ranks had to agree
        assert [row["ok"] for row in report.rows] == [False, True, True], report.rows
        assert "the reference failed: RuntimeError: out of memory" in report.rows[0]["problem"]


def test_the_check_fails_and_names_exactly_the_cases_a_broken_ring_gets_wrong(two_faults):
    report = two_faults[0][1]
    failing = {row["index"] for row in report.failures}
    ring_cases = {row["index"] for row in report.rows if row["ring"] > 1}
    assert ring_cases and len(ring_cases) < report.cases
    assert failing == ring_cases, [row["problem"] for row in report.failures]
    # both dtypes of each ring case fail, on usp's own comparison (not the single-device one)
    assert len(report.failures) == 2 * len(ring_cases)
    assert all(re.match(r"(out|dq|dk|dv) error .* > bound", row["problem"])
               for row in report.failures), [row["problem"] for row in report.failures]


def test_a_dropped_window_fails_even_on_one_device_with_the_case_named(monkeypatch, capsys):
    def no_window(window, seq_len):
        return None

    monkeypatch.setattr(usp.mask, "window_sides", no_window)
    status = cli.main(["check", "--nproc", "1", "--device", "cpu", "--cases", "6",
                       "--masks", "window", "none", "--seed", "1"])
    printed = capsys.readouterr().out
    cases = draw_cases(6, 1, "cpu", seed=1, masks=("window", "none"))
    hides_something = {
        case.index for case in cases if case.window is not None and not torch.equal(
            dense_visible(case.token_ids(), case.causal, case.window),
            dense_visible(case.token_ids(), case.causal, None))}
    assert status == 1 and hides_something
    failed = {int(n) for n in re.findall(r"^  case (\d+): .*single-device", printed, re.MULTILINE)}
    assert failed == hides_something, printed[-3000:]
    assert re.search(rf"usp check: FAILED: {2 * len(hides_something)} of 12 checks", printed)


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "fp8"], "invalid choice"),
])
def test_bad_flags_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", *argv])
    assert message in capsys.readouterr().err


def test_bad_values_are_one_line_errors(capsys):
    assert cli.main(["check", "--nproc", "1", "--masks", "diagonal"]) == 2
    assert "masks ['diagonal']: choose from" in capsys.readouterr().err
    assert cli.main(["check", "--nproc", "0", "--device", "cpu"]) == 2
    assert "--nproc 0 must be at least 1" in capsys.readouterr().err
    assert cli.main(["check", "--nproc", "2", "--kernel", "fastest"]) == 2
    assert "kernel 'fastest': choose auto or one of" in capsys.readouterr().err
