"""Whether an inner optimizer lets the mask update run before it.

Where it may, a step runs the mask update first and then the inner update on the
gradients masked by ``keep``, with the state already zeroed outside ``keep``
(``_transform._early_event``). That is the late order's update (the inner update on
the old mask's gradients, the mask update, then the state zeroed outside ``keep``)
bit for bit when, at each masked position, the inner update

* computes the new state and the update elementwise: no reduction, matrix product or
  control flow over the gradients, state or params (global-norm clipping, Adafactor's
  factored moments and ``MultiSteps`` are not);
* keeps the new state at 0 where the state and the gradient are 0 (Adam's ``eps``
  inside the second moment, as AdaBelief has, does not);
* computes the new state without the params (weight decay added to the gradient
  before a momentum, ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(...,
  momentum))``, does not: a weight pruned there would keep ``wd * p`` in its state).

``elementwise`` reads that off the jaxpr of ``inner.update`` (tracing only, nothing
compiled); when it says no, the wrapper decides with a ``lax.cond`` after the update.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

# Position by position: out[i] depends on in[i] only.
_ELEMENTWISE = frozenset((
    "add", "sub", "mul", "div", "neg", "abs", "sign", "sqrt", "rsqrt", "cbrt", "square",
    "integer_pow", "pow", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
    "max", "min", "select_n", "convert_element_type", "copy", "copy_p", "eq", "ne", "lt",
    "le", "gt", "ge", "and", "or", "not", "is_finite", "clamp", "nextafter", "sin", "cos",
    "atan2", "erf", "floor", "ceil", "round", "stop_gradient", "reduce_precision"))
# Zero wherever every data operand is zero (the others: any operand zero; none).
_ZERO_IF_ALL = frozenset(("add", "sub", "neg", "abs", "sign", "sqrt", "cbrt", "square",
                          "integer_pow", "max", "min", "convert_element_type", "copy",
                          "copy_p", "select_n", "stop_gradient", "reduce_precision",
                          "floor", "ceil", "round", "clamp"))
_ZERO_IF_ANY = frozenset(("mul",))
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclasses.dataclass(frozen=True)
class _Flags:
  data: bool = False  # derived from a masked leaf's gradient, state or param
  params: bool = False  # depends on a masked leaf's param
  coupled: bool = False  # mixes positions (or leaves) of masked data
  zero: bool = False  # 0 wherever the masked gradients and state are 0


_OTHER = _Flags()


def elementwise(inner: optax.GradientTransformation, grads, inner_state, params, masks,
                extra_args) -> bool:
  """Whether ``inner.update`` meets the module docstring's three conditions.

  Args:
    inner: the inner transformation (``GradientTransformationExtraArgs``).
    grads, inner_state, params: the update's arguments (arrays or tracers).
    masks: bool masks like ``params``, None on dense leaves.
    extra_args: the extra keyword arguments of the update.
  """
  flagged = optax.tree_map_params(
      inner, lambda s, m: m is not None and getattr(s, "shape", None) == m.shape,
      inner_state, masks, transform_non_params=lambda _: False)
  masked = jax.tree.map(lambda p, m: m is not None, params, masks)
  args = (grads, inner_state, params, extra_args)
  try:
    closed, out_shape = jax.make_jaxpr(
        lambda g, s, p, e: inner.update(g, s, p, **e), return_shape=True)(*args)
  except Exception:  # pylint: disable=broad-except
    return False  # not traceable apart from the step: decide after the update
  flags = ([_Flags(data=f, zero=f) for f in jax.tree.leaves(masked)]
           + [_Flags(data=f, zero=f) for f in jax.tree.leaves(flagged)]
           + [_Flags(data=f, params=f) for f in jax.tree.leaves(masked)]
           + [_OTHER] * len(jax.tree.leaves(extra_args)))
  outs = _walk(closed.jaxpr, closed.consts, flags)
  updates_out, state_out = jax.tree.unflatten(jax.tree.structure(out_shape), outs)
  state_ok = all(o.zero and not o.params and not o.coupled
                 for o, f in zip(jax.tree.leaves(state_out), jax.tree.leaves(flagged)) if f)
  updates_ok = all(not o.coupled for o, f in zip(jax.tree.leaves(updates_out),
                                                  jax.tree.leaves(masked)) if f)
  return state_ok and updates_ok


def _walk(jaxpr, consts, in_flags) -> list:
  """The output flags of ``jaxpr`` given its inputs' (constants: other)."""
  env = {}
  for v in jaxpr.constvars:
    env[v] = _OTHER
  for v, f in zip(jaxpr.invars, in_flags):
    env[v] = f
  for eqn in jaxpr.eqns:
    ins = [_read(env, v) for v in eqn.invars]
    outs = _eqn(eqn, ins)
    for v, f in zip(eqn.outvars, outs):
      env[v] = f
  return [_read(env, v) for v in jaxpr.outvars]


def _read(env, v) -> _Flags:
  if hasattr(v, "val"):  # a literal: zero if it is
    return _Flags(zero=bool(np.all(np.asarray(v.val) == 0)))
  return env[v]


def _eqn(eqn, ins) -> list:
  """The flags of one equation's outputs."""
  name = eqn.primitive.name
  sub = next((eqn.params[k] for k in _CALLS if k in eqn.params), None)
  data = any(f.data for f in ins)
  params = any(f.params for f in ins)
  coupled = any(f.coupled for f in ins)
  if sub is not None and name not in ("cond", "while", "scan"):
    inner_jaxpr = getattr(sub, "jaxpr", sub)
    return _walk(inner_jaxpr, getattr(sub, "consts", ()), ins)
  if name in ("broadcast_in_dim", "reshape", "squeeze", "expand_dims"):
    same = all(np.shape(v.aval) == np.shape(eqn.outvars[0].aval) or not f.data
               for v, f in zip(eqn.invars, ins) if hasattr(v, "aval"))
    f = ins[0]
    return [_Flags(data, params, coupled or not same, f.zero and same)]
  if name in _ELEMENTWISE:
    operands = ins[1:] if name == "select_n" else ins
    if name in _ZERO_IF_ALL:
      zero = all(f.zero for f in operands)
    elif name in _ZERO_IF_ANY:
      zero = any(f.zero for f in operands)
    else:
      zero = name == "div" and ins[0].zero
    return [_Flags(data, params, coupled, zero)] * len(eqn.outvars)
  # Anything else mixes positions: coupled if it touches masked data.
  return [_Flags(data, params, coupled or data, False)] * len(eqn.outvars)
