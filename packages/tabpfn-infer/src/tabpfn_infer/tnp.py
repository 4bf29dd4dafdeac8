"""Old import path of `tabpfn_infer.training.tnp` (bench/ imports it): the same module."""

import sys

from tabpfn_infer.training import tnp

sys.modules[__name__] = tnp
