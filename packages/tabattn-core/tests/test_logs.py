"""LogOnce: each key logged the first time only, at its level, with its arguments."""

from __future__ import annotations

import logging

from tabattn_core.logs import LogOnce


def test_each_key_is_logged_once(caplog):
    said = LogOnce()
    with caplog.at_level(logging.INFO, logger="tabattn"):
        for _ in range(3):
            said("a", logging.INFO, "choice %s", "a")
            said(("b", 1), logging.WARNING, "fallback %d", 7)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "choice a"),
        (logging.WARNING, "fallback 7"),
    ]
    said.clear()
    with caplog.at_level(logging.INFO, logger="tabattn"):
        said("a", logging.INFO, "again")
    assert caplog.records[-1].getMessage() == "again"
