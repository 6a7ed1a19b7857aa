r"""Step time of five Flax clients' training steps, sparse / dense (issue 34).

Five client programs' shapes, reduced to CPU sizes but each trained the way its
Flax example trains it:

* ``resnet18``: the Flax imagenet example's ResNet18 (linen, 7x7/2 stem + max pool,
  BasicBlock stages [2, 2, 2, 2], BatchNorm with ``batch_stats``, 1000 classes) on
  32x32 images, batch 32, SGD Nesterov momentum 0.9 with a warmup-cosine schedule,
  the example's L2 penalty in the loss, ``apply_gradients(grads=...,
  batch_stats=...)``. The example runs ``jax.pmap``; here plain ``jax.jit`` on
  one device (without the ``pmean``).
* ``mnist_linen``: Flax examples/mnist: Conv(32, 3x3) relu avgpool, Conv(64, 3x3)
  relu avgpool, Dense(256) relu, Dense(10); SGD momentum 0.9, batch 128; as in the
  example two jitted functions, ``apply_model`` (loss, grads, accuracy; always plain
  ``jax.jit``) and ``update_model`` (``state.apply_gradients``; the one jitted each
  way below).
* ``mnist_nnx``: the same layers in NNX, as the NNX MNIST tutorial trains them:
  ``nnx.Optimizer(model, adamw(0.005, 0.9), wrt=nnx.Param)``, an ``nnx.MultiMetric``
  updated in the step, ``optimizer.update(model, grads)``, ``nnx.jit``.
* ``lm1b``: an lm1b-like linen decoder (``experiments/models/transformer.GPT``:
  ``nn.Embed``, pre-LN ``MultiHeadDotProductAttention`` blocks; vocab 256, 2 layers,
  width 128, 4 heads, MLP 512, dropout 0.1 with the example's per-step
  ``fold_in`` key), sequences of 64, batch 16, AdamW (b2 0.98, weight decay 0.1,
  rsqrt warmup schedule), padding-weighted loss, ``jax.jit(..., donate_argnums=0)``.
* ``gemma``: a gemma-like NNX decoder of the same sizes (``nnx.Einsum`` attention
  kernels ``[width, heads, head_dim]`` / ``[heads, head_dim, width]``, gated GELU
  MLP, ``RMSNorm``, logits through the tied embedding; no RoPE), Adam, ``nnx.jit``.

Variants, each client's all interleaved in the same rounds (medians over rounds,
per-call reps calibrated per variant):

* ``dense``: the step with the client's plain optimizer.
* ``<method>/ordinary/jit``: the sparse step (GraNet or RigL at 90%, mask updates
  so rare that none falls in the run) under plain ``jax.jit`` / ``nnx.jit``: the
  mask-update decision is in the graph (a ``lax.cond``).
* ``<method>/ordinary/scheduled_jit``: the same under ``sparse_jax.scheduled_jit(tx)``
  (``jit=nnx.jit`` for NNX): the ordinary program, compiled without the event branch.
* ``<method>/event/jit``: the sparse step with mask updates every 100 steps, its
  wrapper's count set to 99 before each call (``_harness.with_count``), so that each
  timed update is the event at t = 100 (GraNet: inside its pruning window, prune +
  drop + grow).
* ``<method>/event/scheduled_jit``: the same under ``scheduled_jit``: with the count
  reset to 99 it reads the state's count after each event program and runs the event
  program again (one device-to-host read per call, as at every real event).

  flock /tmp/sparse_jax_heavy.lock .venv/bin/python -m experiments.benchmarks.client_steps \
      --rounds=9 --out=experiments/benchmarks/client_steps.json

Targets: the ordinary step under ``scheduled_jit`` costs about what static sparse
training costs (the masked update, no event branch), so close to dense; plain
``jit`` pays the in-graph decision on top. The event step is the rare (every
``update_every`` steps) mask update. Figures before this benchmark (CPU, by the
issue's author): ResNet18 at 32 px ordinary 1.37x dense under plain jit and 1.08x
under scheduled_jit, event 2.3-2.4x; lm1b event 1.26-1.29x.
"""

import argparse
import json
import os
import threading
import time
import warnings
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

import sparse_jax
from experiments.benchmarks import _harness
from experiments.models import resnet
from experiments.models import transformer
from experiments.trainer import compilation_cache

NEVER = 10**6  # update_every of the ordinary variants: no event in the run
EVERY = 100  # update_every of the event variants; the timed update is t = EVERY
VOCAB, WIDTH, DEPTH, HEADS, MLP, SEQ = 256, 128, 2, 4, 512, 64  # both decoders


def make_tx(method, inner, every):
  """``inner`` wrapped by ``method`` at 90% sparsity, mask updates every ``every``."""
  total = 10 * every
  if method == "granet":
    return sparse_jax.granet(inner, sparsity=0.9, total_steps=total, end_step=total // 2,
                             update_every=every)
  if method == "rigl":
    return sparse_jax.rigl(inner, sparsity=0.9, total_steps=total, update_every=every)
  raise ValueError(f"unknown method {method!r}")


def xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def linen_runner(advance, state):
  """``(run, set_count)`` of a linen client: ``run()`` does ``state = advance(state)``."""
  box = [state]

  def run():
    box[0] = advance(box[0])
    return box[0].params

  def set_count(count):
    box[0] = _harness.with_count(box[0], count)
  return run, set_count


def nnx_runner(step, model, optimizer, *args):
  """``(run, set_count)`` of an NNX client: ``run()`` calls ``step(model, optimizer, ...)``."""
  def run():
    step(model, optimizer, *args)
    return optimizer.step.get_value()  # an output of the step's program, ready with the rest

  def set_count(count):
    optimizer.opt_state.count.set_value(jnp.asarray(count, jnp.int32))
  return run, set_count


# ResNet18 (Flax examples/imagenet).

class ResNetState(train_state.TrainState):
  batch_stats: Any


def resnet18_inner():
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 500, 10_000)
  return optax.sgd(lr, momentum=0.9, nesterov=True)


def resnet18_step(state, images, labels):
  def loss_fn(params):
    logits, new_vars = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images,
        mutable=["batch_stats"])
    l2 = sum(jnp.sum(p**2) for p in jax.tree.leaves(params) if p.ndim > 1)
    return xent(logits, labels).mean() + 0.5e-4 * l2, new_vars
  grads, new_vars = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=new_vars["batch_stats"])


def resnet18_client(tx, jit, batch=32):
  model = resnet.ResNet(stage_sizes=(2, 2, 2, 2), block_cls=resnet.BasicBlock,
                        num_classes=1000, imagenet_stem=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 1000)
  variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
  state = ResNetState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"], tx=tx)
  step = jit(resnet18_step)
  return linen_runner(lambda s: step(s, x, y), state)


# MNIST CNN (Flax examples/mnist, linen; the NNX MNIST tutorial).

class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(256)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


def mnist_batch(batch=128):
  return (jax.random.normal(jax.random.PRNGKey(1), (batch, 28, 28, 1)),
          jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10))


@jax.jit
def mnist_apply_model(state, images, labels):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images)
    return xent(logits, labels).mean(), logits
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return grads, loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def mnist_update_model(state, grads):
  return state.apply_gradients(grads=grads)


def mnist_linen_client(tx, jit):
  x, y = mnist_batch()
  model = LinenCNN()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.PRNGKey(0), x[:1])["params"], tx=tx)
  update = jit(mnist_update_model)
  return linen_runner(lambda s: update(s, mnist_apply_model(s, x, y)[0]), state)


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.linear1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = nnx.relu(self.linear1(x.reshape(x.shape[0], -1)))
    return self.linear2(x)


def mnist_nnx_step(model, optimizer, metrics, images, labels):
  def loss_fn(model):
    logits = model(images)
    return xent(logits, labels).mean(), logits
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  metrics.update(loss=loss, logits=logits, labels=labels)
  optimizer.update(model, grads)


def mnist_nnx_client(tx, jit):
  model = NNXCNN(nnx.Rngs(0))
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                            loss=nnx.metrics.Average("loss"))
  return nnx_runner(jit(mnist_nnx_step), model, nnx.Optimizer(model, tx, wrt=nnx.Param),
                    metrics, *mnist_batch())


# Decoders: lm1b-like (linen) and gemma-like (NNX).

def token_batch(batch=16):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, SEQ + 1), 1, VOCAB)
  return tokens[:, :-1], tokens[:, 1:]


def lm1b_inner():
  def rsqrt(step):  # the lm1b example's schedule: linear warmup, then 1/sqrt(step)
    step = jnp.maximum(step, 1.0)
    return 0.0016 * jnp.minimum(1.0, step / 1000) * jax.lax.rsqrt(jnp.maximum(step, 1000.0))
  return optax.adamw(rsqrt, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1)


def lm1b_step(state, inputs, targets, dropout_rng):
  dropout_rng = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, inputs, train=True,
                            rngs={"dropout": dropout_rng})
    weights = (targets > 0).astype(jnp.float32)  # the example's padding weights
    return (xent(logits, targets) * weights).sum() / weights.sum()
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss}


def lm1b_client(tx, jit):
  inputs, targets = token_batch()
  model = transformer.GPT(num_classes=VOCAB, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                          mlp_dim=MLP, dropout_rate=0.1)
  params = model.init(jax.random.PRNGKey(0), inputs[:1], train=False)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  step, rng = jit(lm1b_step, donate_argnums=0), jax.random.PRNGKey(3)
  return linen_runner(lambda s: step(s, inputs, targets, rng)[0], state)


class GemmaBlock(nnx.Module):
  def __init__(self, rngs):
    head_dim = WIDTH // HEADS
    self.pre_attn_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
    self.q, self.k, self.v = (nnx.Einsum("BTD,DNH->BTNH", (WIDTH, HEADS, head_dim), rngs=rngs)
                              for _ in range(3))
    self.attn_out = nnx.Einsum("BTNH,NHD->BTD", (HEADS, head_dim, WIDTH), rngs=rngs)
    self.pre_mlp_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
    self.gate = nnx.Linear(WIDTH, MLP, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(WIDTH, MLP, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(MLP, WIDTH, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = self.pre_attn_norm(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
    x = x + self.attn_out(jnp.einsum("BNTS,BSNH->BTNH", probs, v))
    h = self.pre_mlp_norm(x)
    return x + self.down(nnx.gelu(self.gate(h)) * self.up(h))


class GemmaDecoder(nnx.Module):
  def __init__(self, rngs):
    self.embedder = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.blocks = nnx.List([GemmaBlock(rngs) for _ in range(DEPTH)])
    self.final_norm = nnx.RMSNorm(WIDTH, rngs=rngs)

  def __call__(self, tokens):
    x = self.embedder(tokens) * jnp.sqrt(WIDTH)
    for block in self.blocks:
      x = block(x)
    return self.embedder.attend(self.final_norm(x))


def gemma_step(model, optimizer, inputs, targets):
  loss_fn = lambda m: xent(m(inputs), targets).mean()
  optimizer.update(model, nnx.grad(loss_fn)(model))


def gemma_client(tx, jit):
  model = GemmaDecoder(nnx.Rngs(0))
  return nnx_runner(jit(gemma_step), model, nnx.Optimizer(model, tx, wrt=nnx.Param),
                    *token_batch())


# client: (api, its dense optimizer, builder(tx, jit) -> (run, set_count)).
CLIENTS = {
    "resnet18": ("linen", resnet18_inner, resnet18_client),
    "mnist_linen": ("linen", lambda: optax.sgd(0.1, momentum=0.9), mnist_linen_client),
    "mnist_nnx": ("nnx", lambda: optax.adamw(0.005, 0.9), mnist_nnx_client),
    "lm1b": ("linen", lm1b_inner, lm1b_client),
    "gemma": ("nnx", lambda: optax.adam(1e-3), gemma_client),
}


def jit_of(api, scheduled, tx):
  """``jit(fn, **kwargs)``: the client's plain jit, or ``scheduled_jit(tx)`` around it."""
  plain = nnx.jit if api == "nnx" else jax.jit
  if not scheduled:
    return plain
  return lambda fn, **kw: sparse_jax.scheduled_jit(tx, jit=plain, **kw)(fn)


def with_count_reset(run, set_count, count):
  """``run``, or ``run`` after setting the wrapper's count to ``count`` (an event)."""
  if count is None:
    return run

  def event():
    set_count(count)
    return run()
  return event


def bench_client(name, methods, rounds):
  """The rows of one client: every variant's median ms and its ratio to dense."""
  api, inner, build = CLIENTS[name]
  table = {"dense": build(inner(), jit_of(api, False, None))[0]}
  for method in methods:
    for kind, every in (("ordinary", NEVER), ("event", EVERY)):
      for jit_name in ("jit", "scheduled_jit"):
        tx = make_tx(method, inner(), every)
        run, set_count = build(tx, jit_of(api, jit_name == "scheduled_jit", tx))
        table[f"{method}/{kind}/{jit_name}"] = with_count_reset(
            run, set_count, EVERY - 1 if kind == "event" else None)
  for run in table.values():  # compile, warm up
    jax.block_until_ready(run())
    jax.block_until_ready(run())
  # scheduled_jit compiles its event program in a background thread after the first
  # ordinary call: let it finish, or it would compete with the timed steps.
  for thread in threading.enumerate():
    if thread.name.startswith("scheduled_jit"):
      thread.join()
  med = _harness.median_latencies({k: (run, ()) for k, run in table.items()}, rounds)
  return [{"client": name, "variant": k, "median_ms": 1e3 * v,
           "ratio_to_dense": v / med["dense"]} for k, v in med.items()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--clients", default=",".join(CLIENTS))
  parser.add_argument("--methods", default="granet,rigl")
  parser.add_argument("--out", default=None, help="write the rows as JSON here")
  args = parser.parse_args()
  compilation_cache.enable()
  # The event variants reset the count the scheduled step has moved past: its
  # drift warning is expected here.
  warnings.filterwarnings("ignore", message="scheduled_jit: the optimizer state is at")
  load_start = os.getloadavg()
  rows = []
  for name in args.clients.split(","):
    t = time.time()
    rows += bench_client(name, args.methods.split(","), args.rounds)
    print(f"{name}: {time.time() - t:.0f} s", flush=True)
  load_end = os.getloadavg()
  print(f"{'client':12s} {'variant':28s} {'median ms':>10s} {'x dense':>8s}")
  for r in rows:
    print(f"{r['client']:12s} {r['variant']:28s} {r['median_ms']:10.2f} "
          f"{r['ratio_to_dense']:8.3f}")
  print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rounds": args.rounds, "methods": args.methods.split(","),
                 "backend": jax.default_backend(), "jax": jax.__version__,
                 "flax": flax.__version__, "loadavg_start": load_start,
                 "loadavg_end": load_end, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
