"""Messages said once per process (a dispatch choice, a fallback and its reason)."""

from __future__ import annotations

import logging
from collections.abc import Hashable


class LogOnce:
    """`say(key, level, message, *args)` logs to the "tabattn" logger the first time a key
    is seen and does nothing after; each module that reports choices holds one."""

    def __init__(self, logger: str = "tabattn") -> None:
        self.log = logging.getLogger(logger)
        self.said: set[Hashable] = set()

    def __call__(self, key: Hashable, level: int, message: str, *args: object) -> None:
        if key not in self.said:
            self.said.add(key)
            self.log.log(level, message, *args)

    def clear(self) -> None:
        """Forget every key (tests that expect a message again)."""
        self.said.clear()
