"""Triton kernels for the attention ops in tabattn-core's registry.

One folder per op (``tabattn_triton/ops/<op>/``: kernels, launchers and the public
function), each tested against the reference in ``tabattn_core``; the ``tabattn.backends``
entry point points at :func:`tabattn_triton.backend.register`. Kernel packages (tabattn-fp8)
import the building blocks they share from :mod:`tabattn_triton.building_blocks` only; the
rest of ``ops`` is internal.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
