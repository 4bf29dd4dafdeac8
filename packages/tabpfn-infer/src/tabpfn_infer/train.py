"""Old import path of `tabpfn_infer.training.train` (bench/ imports it): the same module."""

import sys

from tabpfn_infer.training import train

sys.modules[__name__] = train
