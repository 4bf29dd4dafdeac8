"""Entry point of the ``fp8`` backend (group ``tabattn.backends``)."""

from __future__ import annotations

from typing import Any


def register(registry: Any) -> None:
    """Register this package's FP8 (sm90) kernels with tabattn-core's op registry.

    Called by tabattn-core when it loads the ``tabattn.backends`` entry points. Release
    0.1.0 ships no kernels, so this registers nothing and returns, on any machine; FP8
    kernels (Hopper only, checked with :func:`tabattn_fp8.require_sm90`) arrive in later
    releases.
    """
    del registry  # nothing to register yet
