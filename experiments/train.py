"""Moved to ``experiments.trainer.train``; this alias goes away in the next release."""
import sys
import warnings

from experiments.trainer import train as _moved

warnings.warn("experiments.train moved to experiments.trainer.train; import it from there.",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
