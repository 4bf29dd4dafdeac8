"""Old import path of `tabpfn_infer.training.train_tnp` (bench/ imports it): the same module."""

import sys

from tabpfn_infer.training import train_tnp

sys.modules[__name__] = train_tnp
