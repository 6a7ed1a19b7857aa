"""How the gradient-flow report prints its numbers (in its text and on its plots)."""

import math


def pct(x):
  """An accuracy (fraction) in percentage points, 2 decimals; ``n/a`` for None/NaN."""
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def tau(t):
  """A Kendall tau with its sign, 3 decimals; ``n/a`` for NaN."""
  return "n/a" if math.isnan(t) else f"{t:+.3f}"


def value(v) -> str:
  """A slice value (``density=0.05``): floats shortest, the rest as they print."""
  return f"{v:g}" if isinstance(v, float) else str(v)


def epochs(values) -> str:
  """Epoch counts as ``30`` or ``30/60``; ``?`` when unknown."""
  return "/".join(str(x) for x in values) or "?"
