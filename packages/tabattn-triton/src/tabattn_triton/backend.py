"""Entry point of the ``triton`` backend (group ``tabattn.backends``)."""

from __future__ import annotations

from typing import Any


def register(registry: Any) -> None:
    """Register this package's Triton kernels with tabattn-core's op registry.

    Called by tabattn-core when it loads the ``tabattn.backends`` entry points. Release
    0.1.0 ships no kernels, so this registers nothing and returns; kernels arrive in later
    releases. It never raises, so a machine with this package installed keeps working on
    the reference backend.
    """
    del registry  # nothing to register yet
