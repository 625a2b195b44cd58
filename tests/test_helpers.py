"""The suite's own checks fail for the right reasons: assert_one_line_error refuses every way a refusal can
go wrong (and accepts a reworded message that still names the key and says the fix)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import assert_error_says, assert_one_line_error

LINE = "error: --set: train.lr: expected a number, got 'fast'"


def _result(stderr: str, code: int = 2, stdout: str = ""):
    """What CliRunner.invoke returns, as far as the helper reads it."""
    return SimpleNamespace(exit_code=code, stdout=stdout, stderr=stderr, output=stdout + stderr)


def test_a_refusal_that_names_the_key_and_says_the_fix_passes_whatever_its_wording():
    check = {"code": 2, "names": ["--set", "train.lr", "'fast'"], "fix": "expected a number"}
    assert assert_one_line_error(_result(LINE + "\n"), **check) == LINE
    reworded = "error: --set: train.lr: 'fast' is not a number; expected a number such as 0.001"
    assert assert_one_line_error(_result(reworded), **check) == reworded
    notes = "Data: 12 images\n" + LINE
    assert assert_one_line_error(_result(notes), **check, after_notes=True) == LINE
    printed = _result(LINE, stdout="Downloading: a file\n")  # a library's print, where a test allows it
    assert assert_one_line_error(printed, **check, allow_stdout=True) == LINE


@pytest.mark.parametrize(
    ("result", "check"),
    [
        (_result(LINE), {"names": ["train.lr", "train.epochs"]}),  # the key is not named
        (_result(LINE), {"fix": "expected a whole number"}),  # the fix is not said
        (_result(LINE, code=1), {}),  # another exit status
        (_result(LINE + "\nand a second line"), {}),
        (_result("note: something\n" + LINE), {}),  # a line before it, not allowed here
        (_result(LINE + "\nnote: after"), {"after_notes": True}),  # the error is not the last line
        (_result("error: one\n" + LINE), {"after_notes": True}),  # two errors
        (_result("Traceback (most recent call last):\n" + LINE), {"after_notes": True}),
        (_result(LINE, stdout="Traceback (most recent call last):\n"), {}),
        (_result(LINE, stdout="Test: acc@1 50.00%\n"), {}),  # a refusal prints nothing on stdout
        (_result("warning: --set: train.lr: expected a number, got 'fast'"), {}),  # not an error line
        (_result(""), {}),
    ],
)
def test_a_refusal_that_goes_wrong_in_any_way_fails_the_check(result, check):
    check = {"code": 2, "names": ["train.lr"], "fix": "expected a number", **check}
    with pytest.raises(AssertionError):
        assert_one_line_error(result, **check)


def test_a_check_must_ask_for_something_and_names_are_a_list():
    with pytest.raises(AssertionError):
        assert_error_says(LINE)
    with pytest.raises(AssertionError):
        assert_error_says(LINE, names="train.lr")  # a string would be checked letter by letter
