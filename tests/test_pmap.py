"""The wrapper under jax.pmap on 8 CPU devices vs one device with the same global batch."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import multidevice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import sparse_jax

    def loss_fn(p, x, y):
      h = jax.nn.relu(x @ p["w1"] + p["b1"])
      logits = h @ p["w2"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k1, (20, 32)) / 4.5, "b1": jnp.zeros(32),
              "w2": jax.random.normal(k2, (32, 5)) / 5.7}
    xs = jax.random.normal(k3, (30, 64, 20))
    ys = jax.random.randint(k4, (30, 64), 0, 5)
    tx = sparse_jax.granet(optax.sgd(0.1, momentum=0.9), sparsity=0.8, total_steps=30,
                           end_step=20, update_every=5)
    n = jax.device_count()

    def step(p, s, x, y, axis=None):
      g = jax.grad(loss_fn)(p, x, y)
      if axis:
        g = jax.lax.pmean(g, axis)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    state = tx.init(params)
    if n == 1:
      run = jax.jit(step)
      for t in range(30):
        params, state = run(params, state, xs[t], ys[t])
      masks = sparse_jax.get_masks(state)
      out = {"params": params, "masks": masks, "replicas_equal": True}
    else:
      rep = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * n), tree)
      run = jax.pmap(lambda p, s, x, y: step(p, s, x, y, "i"), axis_name="i")
      p, s = rep(params), rep(state)
      for t in range(30):
        p, s = run(p, s, xs[t].reshape(n, -1, 20), ys[t].reshape(n, -1))
      masks = sparse_jax.get_masks(s)
      equal = all(bool(jnp.all(m == m[0])) for m in jax.tree.leaves(masks))
      out = {"params": jax.tree.map(lambda a: a[0], p),
             "masks": jax.tree.map(lambda a: a[0], masks), "replicas_equal": equal}
    out = {"params": {k: np.asarray(v).tolist() for k, v in out["params"].items()},
           "masks": {k: np.asarray(v).tolist() for k, v in out["masks"].items() if v is not None},
           "replicas_equal": out["replicas_equal"], "devices": n}
    print(json.dumps(out))
""")


def run(devices):
  env = multidevice.env(devices)
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == devices
  return out


@pytest.mark.multidevice
def test_pmap_on_8_devices_matches_one_device():
  one, many = run(1), run(8)
  assert many["replicas_equal"]  # the same masks on every device
  for name in ("w1", "w2"):
    m1, m8 = np.asarray(one["masks"][name]), np.asarray(many["masks"][name])
    # 80% of 20*32 + 32*5 = 800 kernel weights pruned: exactly 160 stay, on both.
    assert m8.shape == m1.shape
    differ = np.argwhere(m1 != m8)
    # Equal except where float reordering of the mean gradient flips a weight
    # sitting on the threshold: at most a couple of positions.
    assert len(differ) <= 2, (name, differ)
  assert sum(np.asarray(one["masks"][k]).sum() for k in ("w1", "w2")) == 160
  assert sum(np.asarray(many["masks"][k]).sum() for k in ("w1", "w2")) == 160
  for name in ("w1", "b1", "w2"):
    p1, p8 = np.asarray(one["params"][name]), np.asarray(many["params"][name])
    same = np.ones(p1.shape, bool) if name == "b1" else (
        np.asarray(one["masks"][name]) == np.asarray(many["masks"][name]))
    np.testing.assert_allclose(p1[same], p8[same], rtol=1e-4, atol=1e-5, err_msg=name)
