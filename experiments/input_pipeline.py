"""Moved to ``experiments.data.input_pipeline``; this alias goes away in the next release."""
import sys
import warnings

from experiments.data import input_pipeline as _moved

warnings.warn("experiments.input_pipeline moved to experiments.data.input_pipeline; "
              "import it from there.", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
