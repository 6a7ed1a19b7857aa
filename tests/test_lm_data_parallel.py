"""The scanned byte-level LM on a 4x2 mesh is data parallel: each device computes B/4.

On a ``("data", "model")`` mesh (experiments/configs/lm_bytes_scan.py ``mesh=4x2``)
the params are FSDP-split over "data"; without constraints on the activations XLA
took the split of the token embedding's table instead of the batch's, gathered the
tokens and labels (``all-gather s32[B/4, L] -> s32[B, L]``) and ran the whole batch
on every device (activations [B, L, width], split only over "model"). The model's
logical constraints (experiments/models/transformer.py) under the trainer's logical
axis rules (experiments/trainer/programs.py) keep the batch split.

Eight CPU devices in a subprocess build the trainer's own programs
(``setup.programs_for``, compiled through ``Programs.compile_soon``, in its
background thread) for a tiny model (width 32, 2 scanned blocks of 4 heads, MLP 64,
64 tokens a window, batch 16, evaluation batch 48): the ordinary dispatch, with the
training set on the device (the config's default) and with stacked batches, the
mask-update step (GraNet) and the evaluation. In each compiled program no array has the global batch's leading
dims [B, L] (token ids, labels, activations, logits, one-hots), and the residual
stream [B/4, L, width] and the logits [B/4, L, 256] are there: a device's share.
"""

import textwrap

import pytest

from tests import multidevice

BATCH, EVAL_BATCH, LENGTH, WIDTH, VOCAB, DATA = 16, 48, 64, 32, 256, 4

SCRIPT = textwrap.dedent(r"""
    import collections, json, re, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from experiments.configs import lm_bytes_scan
    from experiments.data import input_pipeline
    from experiments.trainer import methods, setup, sharding, state as state_lib

    B, E, L, N_TRAIN = 16, 48, 64, 40  # the training set on the device: 40 windows
    assert jax.device_count() == 8

    def shapes(text):
      # The dims of every array in a compiled program's text.
      return [[int(d) for d in dims.split(",")]
              for dims in re.findall(r"\b[a-z]+\d*\[([\d,]+)\]", text)]

    def programs(on_device):
      c = lm_bytes_scan.get_config("method=granet,sparsity=0.8,seed=1,mesh=4x2")
      c.model_kwargs = dict(width=32, depth=2, num_heads=4, mlp_dim=64, dropout_rate=0.0,
                            scan_layers=True, remat=True)
      c.dtype, c.batch_size, c.steps_per_dispatch = "float32", B, 2
      c.data_on_device = on_device
      info = input_pipeline.DatasetInfo(
          num_train_examples=400, num_eval_examples=0, num_classes=256, input_shape=(L,),
          eval_split="test", input_dtype="int32", byte_level=True)
      spe = 400 // B
      mesh = sharding.data_mesh(c)
      model = state_lib.create_model(c, 256)
      tx_fn = methods.create_tx_fn(c, model, info, spe)
      state = state_lib.create_sharded_train_state(c, model, tx_fn, (L,), jax.random.PRNGKey(0),
                                                   mesh, "fsdp", "int32")
      timings = collections.defaultdict(float, compile_s={})
      return setup.programs_for(c, mesh, state, model, tx_fn(None), info, spe, False,
                                timings), state, mesh

    out = {}
    for on_device in (True, False):
      progs, state, mesh = programs(on_device)
      repl = NamedSharding(mesh, P())
      tokens = lambda shape, spec=P(): jax.ShapeDtypeStruct(shape, jnp.int32,
                                                            sharding=NamedSharding(mesh, spec))
      if on_device:  # the trainer's Feed: the set replicated, the indices of each step
        data = (tokens((N_TRAIN, L)), tokens((N_TRAIN, L)), tokens((2, B)))
      else:  # stacked batches [steps, B, L], split over "data"
        data = {k: tokens((2, B, L), P(None, "data")) for k in ("image", "label")}
      progs.compile_soon(False, (state, data, tokens(())))
      key = "device" if on_device else "stacked"
      out[key] = shapes(progs[False].as_text())
      if on_device:  # the mask-update step, and the evaluation
        progs.compile_soon(True, (state, data, tokens(())))
        out["event"] = shapes(progs[True].as_text())
        batch = {"image": tokens((E, L), P("data")), "label": tokens((E, L), P("data")),
                 "mask": jax.ShapeDtypeStruct((E,), jnp.float32,
                                              sharding=NamedSharding(mesh, P("data")))}
        progs.compile_soon("eval", (state, batch))
        out["eval"] = shapes(progs["eval"].as_text())
      progs.shutdown()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled_shapes():
  return multidevice.run_json(SCRIPT, timeout=600)


@pytest.mark.multidevice
@pytest.mark.parametrize("program,batch", [("device", BATCH), ("stacked", BATCH),
                                           ("event", BATCH), ("eval", EVAL_BATCH)])
def test_each_device_computes_its_share_of_the_batch(compiled_shapes, program, batch):
  shapes = compiled_shapes[program]
  # Nothing of the whole batch: no gathered token ids or labels, no activation.
  whole = [s for s in shapes if s[:2] == [batch, LENGTH]]
  assert not whole, sorted(set(map(tuple, whole)))
  # A device's share: the residual stream and the logits of batch / 4 windows.
  share = batch // DATA
  assert [share, LENGTH, WIDTH] in shapes, sorted(set(map(tuple, shapes)))
  assert [share, LENGTH, VOCAB] in shapes, sorted(set(map(tuple, shapes)))
