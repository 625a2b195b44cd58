"""The errors a user can cause, each with its own exit code.

They are raised deep in the library and turned into one line and an exit code
in exactly one place: ``vggft.cli``.
"""

from __future__ import annotations


class VggftError(Exception):
    """Something the user can fix; the message says what and how."""

    exit_code = 1
    rank_specific = False  # met by one process of a distributed job (e.g. out of memory), not by all


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


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): for one-line errors."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
