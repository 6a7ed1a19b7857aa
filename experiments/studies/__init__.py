"""Studies: grids of trainer runs and the reports made from them.

One module per study (``lenet300``, ``structured``, ``transformers``, ``plasticity``,
``post_training``, ``scsdc``, ``gradient_flow/``), the sweeps sharing ``_grid``; each
is run with ``python -m experiments.studies.<name>`` and writes its tables and plots
under ``experiments/results/``. ``mask_dynamics`` analyses the masks a run recorded.
Studies import the trainer; the trainer never imports a study.
"""
