"""Triton kernels for the attention ops in tabattn-core's registry.

This package will hold one folder per op (``tabattn_triton/ops/<op>/`` with ``kernel.py``
and ``interface.py``), each tested against the reference in ``tabattn_core``. Release
0.1.0 is the packaging skeleton: it registers no kernels yet; they arrive in later
releases. The ``tabattn.backends`` entry point points at :func:`tabattn_triton.backend.register`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
