"""Autoregressive predictor for TabPFN-style models and transformer neural processes.

This package will hold the model, the predictor (joint sampling over a shared context,
joint density by teacher forcing, marginals), the training loop, the synthetic prior and
the ``tabpfn-infer`` CLI. It reaches attention kernels only through tabattn-core's op
registry. Release 0.1.0 is the packaging skeleton: the CLI reports versions only; model
commands arrive in later releases.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
