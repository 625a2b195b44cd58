"""The errors a user can cause, each with its own exit code.

They are raised deep in the library and turned into one line and an exit code
in exactly one place: ``vggft.cli``.
"""

from __future__ import annotations


class VggftError(Exception):
    """Something the user can fix; the message says what and how."""

    exit_code = 1
    rank_specific = False  # met by one process of a distributed job (e.g. out of memory), not by all

    def __init__(self, message: str = ""):
        super().__init__(_from_worker(message))


def _from_worker(message: str) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker.

    torch re-raises a worker's exception as the same type with its whole traceback as the message
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); the user's line is its last.
    """
    if not (isinstance(message, str) and message.startswith("Caught ") and "Original Traceback" in message):
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "Error" in head else last


class ConfigError(VggftError):
    exit_code = 2


class DataError(VggftError):
    exit_code = 3


class WeightsError(VggftError):
    """Pretrained weights or a checkpoint that cannot be used."""

    exit_code = 4


class DeviceError(VggftError):
    exit_code = 5


class OutputError(VggftError):
    """An output path that cannot be written."""

    exit_code = 6


class OutOfMemoryError(VggftError):
    exit_code = 7


def check_option(ok: bool, option: str, expected: str, got: object) -> None:
    """A senseless option value is one line naming the option, what it takes and what it got (exit 2).

    The library checks its own arguments with it, so the CLI and Python callers get the same words."""
    if not ok:
        raise ConfigError(f"{option}: expected {expected}, got {got}")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): for one-line errors."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class DivergedError(VggftError):
    """Training produced a non-finite loss: the settings make it diverge."""

    exit_code = 8


class Interrupted(VggftError):
    """Ctrl-C: the message says what was kept and how to go on."""

    exit_code = 130
