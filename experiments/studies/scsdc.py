r"""Same-capacity sparse vs dense comparison (SC-SDC, docs/algorithms.md §8).

A sparse network of width ``w`` at density ``d`` is compared with a dense network
of the same family and depth whose width ``w'`` is reduced so that its number of
weights equals the sparse network's number of active weights. "Weights" are the
prunable leaves (kernels, ``ndim >= 2``: what the sparse methods mask); biases and
normalisation parameters are not counted (the dense net has slightly fewer of them,
since it is narrower).

The solver. The weight count ``P(w)`` of a family is counted exactly from the
model's parameter shapes (``jax.eval_shape`` of ``init``, no FLOPs). It is
increasing in the width (a quadratic in ``w`` for both families here), so the
width is found by integer bisection for the largest ``w'`` with ``P(w') <= A``,
then the better of ``w'`` and ``w' + 1`` (smallest ``|P - A|``, ties to the
smaller width) is taken. ``A`` is the sparse net's active count as the sparse
methods build it: ``round_half_up(d * P(w))`` (``sparse_jax.active_count``). An
integer width rarely hits ``A`` exactly; the leftover ``P(w') - A`` is reported
(it is at most about half of ``dP/dw``: for the MLP ``(D + C) / 2 + (L-1) w'``
weights, e.g. +2.6% of ``A`` for a 784-256-256-10 MLP at density 0.05 and under
0.5% from density 0.2 up; run this module to print the table).

Both networks use the same initialisation scheme (the family's PyTorch-default
``U(+-1/sqrt(fan_in))``; fan-in is the dense fan-in also for the sparse net, as
in the sparse-training code bases) and the same training recipe: the config only
differs in the width and in ``sparsity.method`` (``static`` vs ``dense``). The
trainer's ``init_scaling="active_fan_in"`` instead rescales each sparse unit by its
active fan-in (``experiments.trainer.state.scale_by_active_fan_in``), the study's
initialisation factor.

  python -m experiments.studies.scsdc --family=mlp --width=256 --depth=2 \
      --densities=0.05,0.2,0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp

import sparse_jax
from experiments import models

FAMILIES = ("mlp", "cnn")


def family_model(family: str, width: int, depth: int = 2, **kwargs) -> tuple[str, dict]:
  """The registry name and ``model_kwargs`` of a family member of ``width``.

  Args:
    family: ``"mlp"`` (``depth`` hidden layers of ``width``) or ``"cnn"``
      (``small_cnn``: convs of ``width`` and ``2 * width``; depth is fixed at 2).
    width: the width.
    depth: the MLP's number of hidden layers.
    **kwargs: other model fields (activation, batch_norm, dropout_rate).

  Returns:
    ``(model name, model_kwargs)`` for the config.
  """
  if width < 1:
    raise ValueError(f"width={width} must be a positive integer.")
  if family == "mlp":
    if depth < 1:
      raise ValueError(f"depth={depth} must be >= 1 for the mlp family.")
    return "mlp", {"features": (int(width),) * int(depth), **kwargs}
  if family == "cnn":
    if depth != 2:
      raise ValueError(f"depth={depth}: the cnn family (small_cnn) has 2 conv layers; "
                       "leave depth at 2.")
    return "small_cnn", {"width": int(width), **kwargs}
  raise ValueError(f"Unknown family {family!r}; use one of {FAMILIES}.")


def weight_count(family: str, width: int, depth: int, input_shape, num_classes: int) -> int:
  """Exact number of prunable weights (leaves with ``ndim >= 2``) of a family member."""
  name, kw = family_model(family, width, depth)
  model = models.get_model(name, num_classes, **kw)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)), train=False))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]) if x.ndim >= 2)


def same_capacity_width(count_fn, target: int, max_width: int | None = None) -> int:
  """The width whose (increasing) weight count ``count_fn(w)`` is closest to ``target``.

  Integer bisection for the largest ``w`` with ``count_fn(w) <= target``, then the
  better of ``w`` and ``w + 1`` (ties to the smaller). Widths are at least 1.

  Args:
    count_fn: weight count of width ``w``, non-decreasing in ``w``.
    target: the count to match (the sparse net's active weights).
    max_width: an upper bound to search below (found by doubling if ``None``).

  Returns:
    The width.
  """
  if target < 1:
    raise ValueError(f"target={target} must be >= 1 (the sparse net has no active weight).")
  hi = max_width or 1
  while max_width is None and count_fn(hi) < target:
    hi *= 2
  lo = 1
  if count_fn(lo) > target:
    return lo
  # Invariant: count_fn(lo) <= target; the answer's floor is in [lo, hi].
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if count_fn(mid) <= target:
      lo = mid
    else:
      hi = mid - 1
  below, above = count_fn(lo), count_fn(lo + 1)
  return lo if target - below <= above - target else lo + 1


@dataclasses.dataclass(frozen=True)
class SameCapacity:
  """A sparse net and its same-capacity dense net (SC-SDC)."""
  sparse_width: int
  density: float
  total_weights: int  # P(sparse_width), the sparse net's dense weight count
  active_weights: int  # A = round_half_up(density * total_weights)
  dense_width: int
  dense_weights: int  # P(dense_width)

  @property
  def leftover(self) -> int:
    """Dense weights minus the sparse net's active weights (the solver's residual)."""
    return self.dense_weights - self.active_weights

  @property
  def relative_leftover(self) -> float:
    return self.leftover / self.active_weights


def same_capacity(family: str, width: int, density: float, *, depth: int = 2,
                  input_shape=(28, 28, 1), num_classes: int = 10) -> SameCapacity:
  """Solves the SC-SDC dense width for a sparse ``family`` net of ``width`` at ``density``.

  Args:
    family: ``"mlp"`` or ``"cnn"``.
    width: the sparse network's width.
    density: its density in (0, 1].
    depth: the MLP's number of hidden layers.
    input_shape: one example's shape (H, W, C).
    num_classes: number of classes.

  Returns:
    A ``SameCapacity`` record (dense width, counts, leftover).
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density={density} must be in (0, 1].")
  count = lambda w: weight_count(family, w, depth, input_shape, num_classes)
  total = count(width)
  active = sparse_jax.active_count(1.0 - density, total)
  dense_width = width if density == 1.0 else same_capacity_width(count, active, width)
  return SameCapacity(width, density, total, active, dense_width, count(dense_width))


def main():
  parser = argparse.ArgumentParser(description="Prints SC-SDC dense widths.")
  parser.add_argument("--family", default="mlp", choices=FAMILIES)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--densities", default="0.05,0.1,0.2,0.5,1.0")
  parser.add_argument("--input_shape", default="28,28,1")
  parser.add_argument("--num_classes", type=int, default=10)
  args = parser.parse_args()
  shape = tuple(int(x) for x in args.input_shape.split(","))
  print("| density | sparse width | weights | active | dense width | dense weights | "
        "leftover | leftover % |")
  print("|---|---|---|---|---|---|---|---|")
  for d in (float(x) for x in args.densities.split(",")):
    r = same_capacity(args.family, args.width, d, depth=args.depth, input_shape=shape,
                      num_classes=args.num_classes)
    print(f"| {d} | {r.sparse_width} | {r.total_weights} | {r.active_weights} | "
          f"{r.dense_width} | {r.dense_weights} | {r.leftover:+d} | "
          f"{100 * r.relative_leftover:+.2f} |")


if __name__ == "__main__":
  main()
