r"""Sparse training of the transformers: ViT on the MNIST subset, byte-level GPT.

Runs dense, GraNet, GMP, RigL, SET and static at 50/75/90% sparsity on both models
(``experiments/configs/vit_mnist5k.py``, ``gpt_bytes.py``), one workdir per run,
skipping runs that already have a ``summary.json`` or a committed record in
``experiments/results/transformers_runs/`` (an interrupted sweep resumes).
Then, for each trained dense GPT, the post-training one-shot baselines at the same
sparsities (``experiments/studies/post_training.py``): global magnitude and Wanda
(|w| * ||x|| of the layer input on 128 training windows, per output), evaluated as
pruned and after a short fine-tune with the mask fixed (``static`` started from the
pruned model, ``config.init_from``). Writes ``experiments/results/transformers.md``.

  python -m experiments.studies.transformers --workdir=workdirs/sweep_transformers \
      [--seeds=0] [--sparsities=0.5,0.75,0.9] [--models=vit,gpt] [--methods=dense,rigl]
"""

import functools
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparse_jax
from experiments.trainer import exports
from experiments.data import input_pipeline
from experiments.studies import post_training
from experiments.trainer import state as state_lib
from experiments.trainer import steps as steps_lib
from experiments.trainer import train
from experiments.configs import gpt_bytes
from experiments.configs import vit_mnist5k
from experiments.studies import _grid

CONFIGS = {"vit": vit_mnist5k.get_config, "gpt": gpt_bytes.get_config}
METHODS = ("dense", "granet", "gmp", "rigl", "set", "static")
RESULTS = _grid.RESULTS
# Each finished run's result fields, committed: the report reads a run from its workdir
# or, when the workdir is gone (workdirs are not in git), from here.
RECORDS = os.path.join(RESULTS, "transformers_runs")
RECORD_FIELDS = ("final_test_accuracy", "best_test_accuracy", "final_test_loss",
                 "final_test_bits_per_byte", "final_sparsity", "train_flops_vs_dense",
                 "inference_flops_vs_dense", "wall_time_s", "steps", "method")
CALIBRATION_WINDOWS = 128
FINETUNE_STEPS = 101  # half an epoch of the GPT recipe (202 steps/epoch)
FINETUNE_LR = 5e-4


def run_dir(workdir, model, method, sparsity, seed):
  tag = "dense" if method == "dense" else f"{method}_s{sparsity}"
  return os.path.join(workdir, model, f"{tag}_seed{seed}")


def _status(run_workdir, record_path, tag):
  """Done: in its workdir, or recorded (its workdir gone)."""
  del tag  # the runner's progress tag: nothing to log
  done = _grid.has_summary(run_workdir) or os.path.exists(record_path)
  return _grid.FINISHED if done else _grid.TO_RUN


def run_all(workdir, models, methods, sparsities, seeds):
  runs = []
  for seed in seeds:
    for model in models:
      for method in methods:
        for s in ([sparsities[0]] if method == "dense" else sparsities):
          d = run_dir(workdir, model, method, s, seed)
          record = run_dir(RECORDS, model, method, s, seed) + ".json"
          config = functools.partial(CONFIGS[model], f"method={method},sparsity={s},seed={seed}")
          runs.append(_grid.GridRun(d, d, config, train.train_and_evaluate,
                                    status=functools.partial(_status, d, record)))
  _grid.run_grid(runs)


def evaluate(model, params, config) -> dict:
  """Per-token validation loss (nats), bits per byte and accuracy of ``params``."""
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                               opt_state=(), rng=jax.random.PRNGKey(0))
  fn = jax.jit(lambda s, b: steps_lib.eval_step(s, b, model=model, num_classes=256))
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for b in input_pipeline.eval_batches(config.dataset, batch_size=config.eval_batch_size,
                                       data_dir=config.data_dir):
    out = jax.device_get(fn(state, b))
    for k in totals:
      totals[k] += float(out[k])
  loss = totals["loss"] / totals["count"]
  return {"loss": loss, "bits_per_byte": loss / math.log(2),
          "accuracy": totals["correct"] / totals["count"]}


def post_training_all(workdir, sparsities, seeds):
  """Magnitude and Wanda one-shot pruning of each dense GPT, as is and fine-tuned."""
  for seed in seeds:
    dense_dir = run_dir(workdir, "gpt", "dense", None, seed)
    if not os.path.exists(os.path.join(dense_dir, "summary.json")):
      continue
    with open(os.path.join(dense_dir, "summary.json")) as f:
      dense_steps = json.load(f)["steps"]
    config = gpt_bytes.get_config(f"method=dense,seed={seed}")
    info = input_pipeline.dataset_info(config.dataset, config.data_dir)
    model = state_lib.create_model(config, info.num_classes)
    template = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *info.input_shape), info.input_dtype),
        train=False))["params"]
    params = exports.fill_from_export(template, exports.load_exported(dense_dir), "params")
    train_set = input_pipeline.load_arrays(config.dataset, "train", config.data_dir)
    rows = post_training.calibration_rows(len(train_set["label"]), CALIBRATION_WINDOWS, seed)
    norms = jax.jit(lambda p, x: post_training.input_feature_norms(
        model, {"params": p}, x, train=False))(params, jnp.asarray(train_set["image"][rows]))
    flops = sparse_jax.model_flops(model, {"params": params}, (1, *info.input_shape),
                                   train=False, input_dtype=info.input_dtype)
    for s in sparsities:
      for name in ("magnitude", "wanda"):
        out_dir = os.path.join(workdir, "gpt_post", f"{name}_s{s}_seed{seed}")
        result_path = os.path.join(out_dir, "result.json")
        if os.path.exists(result_path):
          continue
        print(f"{time.strftime('%H:%M:%S')} post-training {out_dir}", flush=True)
        t = time.time()
        masks = (post_training.magnitude_masks(params, s) if name == "magnitude"
                 else post_training.wanda_masks(params, norms, s))
        pruned = sparse_jax.apply_masks(params, masks)
        one_shot = evaluate(model, pruned, config)
        os.makedirs(out_dir, exist_ok=True)
        exports.export_model(os.path.join(out_dir, "pruned.npz"), pruned, {}, masks)
        # sparsity=0: static takes the exported masks as they are (Wanda's per-output
        # rounding leaves them a little off the target, e.g. 0.899 at 0.9).
        ft = gpt_bytes.get_config(f"method=static,sparsity=0,seed={seed}")
        ft.init_from = os.path.join(out_dir, "pruned.npz")
        ft.num_train_steps = FINETUNE_STEPS
        ft.learning_rate = FINETUNE_LR
        ft.warmup_epochs = 0.05
        ft_summary = train.train_and_evaluate(ft, os.path.join(out_dir, "finetune"))
        kept = {k: float(v) for k, v in sparse_jax.as_layer_densities(masks).items()
                if k in flops.layers}
        result = {
            "method": name, "sparsity": s, "seed": seed,
            "measured_sparsity": 1.0 - int(sparse_jax.count_active(masks))
                                 / sparse_jax.count_prunable(masks),
            "one_shot": one_shot,
            "finetuned": {"loss": ft_summary["final_test_loss"],
                          "bits_per_byte": ft_summary["final_test_bits_per_byte"],
                          "accuracy": ft_summary["final_test_accuracy"],
                          "mask_sparsity": ft_summary["mask_sparsity"]},
            "inference_flops_vs_dense": sparse_jax.inference_flops(flops, kept)
                                        / sparse_jax.inference_flops(flops, {}),
            # The dense run, then the fine-tune (relative to dense steps of its length).
            "train_flops_vs_dense": 1.0 + ft_summary["train_flops_vs_dense"]
                                    * FINETUNE_STEPS / dense_steps,
            "wall_time_s": time.time() - t,
        }
        with open(result_path, "w") as f:
          json.dump(result, f, indent=1)


def _record_fields(summary):
  return {k: summary[k] for k in RECORD_FIELDS if k in summary}


def load_runs(workdir, model, methods, sparsities, seeds, records=RECORDS):
  """``{(method, sparsity or None for dense): [result of each seed's run]}``."""
  def read(method, s, seed):
    return _grid.read_run(
        os.path.join(run_dir(workdir, model, method, s, seed), "summary.json"),
        run_dir(records, model, method, s, seed) + ".json", _record_fields)
  return _grid.collect(((method, s), (read(method, s, seed) for seed in seeds))
                       for method in methods
                       for s in ([None] if method == "dense" else sparsities))


def load_post(workdir, sparsities, seeds, records=RECORDS):
  """``{(pruning, sparsity): [result of each seed]}`` of the post-training runs."""
  def read(tag):
    return _grid.read_run(os.path.join(workdir, "gpt_post", tag, "result.json"),
                          os.path.join(records, "gpt_post", f"{tag}.json"))
  return _grid.collect(((name, s), (read(f"{name}_s{s}_seed{seed}") for seed in seeds))
                       for name in ("magnitude", "wanda") for s in sparsities)


def _ms(values, scale=1.0, digits=2):
  values = [scale * v for v in values]
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _mean(runs, key):
  return np.mean([r[key] for r in runs])


def _cost_cells(runs) -> str:
  """The columns both training tables end with: final sparsity, FLOPs, wall time, seeds."""
  return (f"{_mean(runs, 'final_sparsity'):.4f} | {_mean(runs, 'train_flops_vs_dense'):.3f} | "
          f"{_mean(runs, 'inference_flops_vs_dense'):.3f} | {_mean(runs, 'wall_time_s'):.0f} | "
          f"{len(runs)} |")


def _intro_lines(vit, gpt, post, seeds, command):
  """The seeds, the command, the wall times, the records, what is masked and counted."""
  all_runs = [r for rows in (vit, gpt) for runs in rows.values() for r in runs]
  post_runs = [r for runs in post.values() for r in runs]
  n_seeds = sorted({len(runs) for rows in (vit, gpt, post) for runs in rows.values()})
  sources = sum("source" in r for rows in (vit, gpt, post) for runs in rows.values()
                for r in runs)
  seeds_note = (f"**1 seed (seed {seeds[0]}) per cell**: the seed-to-seed spread is not "
                "measured here, so small differences between rows are not rankings."
                if n_seeds == [1] else
                f"Mean ± std over the seeds of each row (column 'seeds'; {seeds}).")
  return [
      "# Sparse training of transformers: ViT on the MNIST subset, byte-level GPT",
      "",
      seeds_note,
      "",
      f"Command: `{command}`",
      "",
      f"Sum of the training runs' wall times: "
      f"{sum(r['wall_time_s'] for r in all_runs) / 60:.1f} min, plus "
      f"{sum(r.get('wall_time_s', 0) for r in post_runs) / 60:.1f} min of post-training "
      f"pruning and fine-tuning ({sum('wall_time_s' in r for r in post_runs)} of the "
      f"{len(post_runs)} post-training runs have a recorded wall time), on a 2-core CPU "
      "shared with other work (wall times are noisy).",
      "",
      "Each run's result is also kept in `experiments/results/transformers_runs/` (the "
      "report reads a run from its workdir, else from there). "
      + (f"{sources} runs come from an earlier table, rounded as it printed them "
         "(their 'source' field says which)." if sources else ""),
      "",
      "Masks are on every kernel (attention q/k/v/out, MLP, the ViT's patch projection, "
      "the heads); embeddings (token, position, class token), biases (the attention's "
      "[heads, head_dim] ones too) and LayerNorms stay dense. ERK layer densities for "
      "RigL/SET/static; GraNet and GMP prune globally by magnitude (cubic schedule). "
      "FLOPs are relative to the dense run (docs/algorithms.md §10): inference = forward pass of the "
      "final masked net; training = forward + input gradient + weight gradient summed "
      "over the run at the densities in force, with a dense weight gradient at "
      "GraNet's and RigL's mask updates. Non-kernel FLOPs (attention scores, softmax, "
      "LayerNorm) count dense, so inference FLOPs do not fall as fast as the density.",
      "",
  ]


def _vit_lines(vit):
  """The ViT section: recipe and table."""
  lines = [
      "## ViT on the MNIST subset (4,000 train / 1,000 test)",
      "",
      "`experiments/configs/vit_mnist5k.py`: patch 4 (49 patches + class token), width "
      "64, 4 blocks of 4 heads, MLP 128; 20 epochs of 31 steps (batch 128), AdamW lr 3e-3, "
      "2 warm-up epochs then cosine, weight decay 0.05, no augmentation; ΔT = 30, "
      "GraNet/GMP prune from epoch 0 to 12, RigL/SET drop fraction 0.3.",
      "",
      "| method | sparsity | test accuracy (%) | best test acc. (%) | final sparsity "
      "| train FLOPs (x dense) | inference FLOPs (x dense) | wall time (s) | seeds |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for (method, s), runs in vit.items():
    lines.append(
        f"| {method} | {'-' if s is None else s} | "
        f"{_ms([r['final_test_accuracy'] for r in runs], 100)} | "
        f"{_ms([r['best_test_accuracy'] for r in runs], 100)} | {_cost_cells(runs)}")
  return lines


def _gpt_lines(gpt, info):
  """The byte-level GPT section: recipe and table."""
  lines = [
      "",
      "## Byte-level GPT on the Python documentation (`bytes_pydoc`)",
      "",
      "`experiments/configs/gpt_bytes.py`: 64-byte windows of `pydoc_data/topics.py` "
      f"(experiments/data/bytes_pydoc.py: {info.num_train_examples:,} train / "
      f"{info.num_eval_examples:,} validation windows on Python {platform.python_version()}"
      "); causal, width 128, 2 blocks of 4 heads, MLP 512; 4 epochs of 202 "
      "steps (batch 32), AdamW lr 2e-3, cosine, weight decay 0.05; ΔT = 50, GraNet/GMP "
      "prune from epoch 0 to 2.5, RigL/SET drop fraction 0.3. Validation loss is per "
      "byte in nats; bits per byte = loss / ln 2 (uniform guessing: 8).",
      "",
      "| method | sparsity | val. loss (nats/byte) | bits per byte | next-byte acc. (%) "
      "| final sparsity | train FLOPs (x dense) | inference FLOPs (x dense) "
      "| wall time (s) | seeds |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for (method, s), runs in gpt.items():
    lines.append(
        f"| {method} | {'-' if s is None else s} | "
        f"{_ms([r['final_test_loss'] for r in runs], digits=3)} | "
        f"{_ms([r['final_test_bits_per_byte'] for r in runs], digits=3)} | "
        f"{_ms([r['final_test_accuracy'] for r in runs], 100)} | {_cost_cells(runs)}")
  lines += ["", "The same GPT written as TPU-pod models are (4 blocks as one `nn.scan`, remat, "
            "bfloat16 compute, masks per block): [lm_scan.md](lm_scan.md)."]
  return lines


def _post_lines(post, info):
  """The post-training section: the two prunings, as pruned and fine-tuned."""
  lines = [
      "",
      "## Post-training one-shot pruning of the trained dense GPT",
      "",
      f"The dense GPT above, pruned once without retraining: global magnitude (top |w| "
      f"over all kernels) or Wanda (|w| * ||x||_2 of each layer's input feature over "
      f"{CALIBRATION_WINDOWS} training windows = {CALIBRATION_WINDOWS * 64:,} tokens, top "
      f"1 - sparsity of every output's weights in each kernel; "
      f"`experiments/studies/post_training.py`). Fine-tuned: {FINETUNE_STEPS} steps "
      f"({FINETUNE_STEPS / (info.num_train_examples // 32):.2f} epoch) of AdamW lr {FINETUNE_LR:g} with cosine decay, the mask fixed (`static` "
      "from the pruned export). Training FLOPs = the dense run + the fine-tune.",
      "",
      "| pruning | sparsity | measured sparsity | one-shot bits/byte | one-shot acc. (%) "
      "| fine-tuned bits/byte | fine-tuned acc. (%) | train FLOPs (x dense) "
      "| inference FLOPs (x dense) | seeds |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for (name, s), runs in post.items():
    lines.append(
        f"| {name} | {s} | {_mean(runs, 'measured_sparsity'):.4f} | "
        f"{_ms([r['one_shot']['bits_per_byte'] for r in runs], digits=3)} | "
        f"{_ms([r['one_shot']['accuracy'] for r in runs], 100)} | "
        f"{_ms([r['finetuned']['bits_per_byte'] for r in runs], digits=3)} | "
        f"{_ms([r['finetuned']['accuracy'] for r in runs], 100)} | "
        f"{_mean(runs, 'train_flops_vs_dense'):.3f} | "
        f"{_mean(runs, 'inference_flops_vs_dense'):.3f} | {len(runs)} |")
  return lines


def write_report(workdir, methods, sparsities, seeds, command, out_md):
  """Writes ``out_md`` from the runs done (workdirs or records)."""
  info = input_pipeline.dataset_info("bytes_pydoc")
  vit = load_runs(workdir, "vit", methods, sparsities, seeds)
  gpt = load_runs(workdir, "gpt", methods, sparsities, seeds)
  post = load_post(workdir, sparsities, seeds)
  lines = [*_intro_lines(vit, gpt, post, seeds, command), *_vit_lines(vit),
           *_gpt_lines(gpt, info), *_post_lines(post, info)]
  with open(out_md, "w") as f:
    f.write("\n".join(lines) + "\n")


def main():
  parser = _grid.sweep_parser(__doc__, workdir="workdirs/sweep_transformers",
                              out=os.path.join(RESULTS, "transformers.md"), seeds="0",
                              sparsities="0.5,0.75,0.9", methods=",".join(METHODS))
  parser.add_argument("--models", default="vit,gpt")
  parser.add_argument("--skip_post_training", action="store_true")
  parser.add_argument("--report_only", action="store_true",
                      help="write the report from the runs done (workdirs or records)")
  args = _grid.parse_lists(parser.parse_args())
  _grid.setup()
  models = args.models.split(",")
  if not args.report_only:
    run_all(args.workdir, models, args.methods, args.sparsities, args.seeds)
  if not args.report_only and not args.skip_post_training and "gpt" in models:
    post_training_all(args.workdir, args.sparsities, args.seeds)
  write_report(args.workdir, args.methods, args.sparsities, args.seeds,
               _grid.command("experiments.studies.transformers"), args.out)
  print(open(args.out).read())


if __name__ == "__main__":
  main()
