"""The trainer: one run of one config, from checked config to summary.

``train.train_and_evaluate`` reads top to bottom as a run happens; each step is a
call into the module that owns it (config_checks, workdir, state, steps, programs,
feed, checkpoints, reporting, exports, flops, mask_history, preemption, sharding,
compilation_cache). ``imp`` runs lottery-ticket rounds on top of it; ``baselines``
holds the pruning-at-init methods; ``inference`` runs an exported model and times it.
The trainer imports data, models and sparse_jax, never a study.
"""
