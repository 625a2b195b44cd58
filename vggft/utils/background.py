"""One function run on a thread of its own while the caller goes on: hashing a file while it is fsynced,
drawing a plot while weights are written. ``result`` joins it and raises what it raised."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Background:
    def __init__(self, function: Callable[..., Any], *args: Any):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function, args), daemon=True,
                                        name=f"vggft-{getattr(function, '__name__', 'background')}")
        self._thread.start()

    def _run(self, function: Callable[..., Any], args: tuple) -> None:
        try:
            self._value = function(*args)
        except BaseException as err:  # handed to whoever asks for the result
            self._error = err

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def settle(self) -> None:
        """Wait for it, whatever it did (an error on the way out must not hide the caller's own)."""
        self._thread.join()
