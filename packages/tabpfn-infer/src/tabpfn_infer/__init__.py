"""Autoregressive predictor for TabPFN-style models and transformer neural processes.

`ARTabPFN` is the AR-TabPFN model with the peer implementation's parameter names and math
(it loads AR-nanoTabPFN checkpoints); `ARTabPFNPredictor` draws joint samples over a shared
context and evaluates joint densities by teacher forcing; `ARTabPFNRegressor` is the same in
dataset terms (fit a context; sample, log_density, predict). Attention runs through
tabattn-core's op registry: the PyTorch references everywhere, Triton kernels where
tabattn-triton is installed and a GPU is present.
"""

from tabpfn_infer.estimator import ARTabPFNRegressor
from tabpfn_infer.model import ARTabPFN, load_peer_state_dict
from tabpfn_infer.predictor import ARTabPFNPredictor

__version__ = "0.1.0"

__all__ = [
    "ARTabPFN",
    "ARTabPFNPredictor",
    "ARTabPFNRegressor",
    "__version__",
    "load_peer_state_dict",
]
