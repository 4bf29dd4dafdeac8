"""Old import path of `tabpfn_infer.training.prior` (bench/ imports it): the same module."""

import sys

from tabpfn_infer.training import prior

sys.modules[__name__] = prior
