"""Text as a terminal shows it: how many columns a string takes (an emoji or a CJK character takes two), and
padding by those columns, so tables of class names line up. Imports nothing but the standard library: the
CLI's tables use it without importing torch."""

from __future__ import annotations

import unicodedata

ZERO_WIDTH = ("Mn", "Me", "Cf")  # combining marks and format characters (joiners, variation selectors)
EMOJI_MODIFIERS = range(0x1F3FB, 0x1F400)  # skin tones: part of the emoji before them


def display_width(text: str) -> int:
    """The terminal columns ``text`` takes: two for East Asian wide and fullwidth characters and for emoji
    (shown as a picture: a variation selector 16 after it), none for combining marks, joiners, variation
    selectors and skin tones, or for the parts of an emoji sequence after a zero-width joiner; one otherwise."""
    width, joined = 0, False
    for i, char in enumerate(text):
        none = joined or unicodedata.category(char) in ZERO_WIDTH or ord(char) in EMOJI_MODIFIERS
        joined = char == "\u200d"
        if none:
            continue
        wide = unicodedata.east_asian_width(char) in ("W", "F") or text[i + 1 : i + 2] == "\ufe0f"
        width += 2 if wide else 1
    return width


def pad(text: str, width: int, *, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` terminal columns (``right``: aligned to the right)."""
    room = " " * max(0, width - display_width(text))
    return room + text if right else text + room
