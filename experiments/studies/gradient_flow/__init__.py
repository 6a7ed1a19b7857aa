"""The "Keep the Gradients Flowing" study: the EGF sweep and its report.

``sweep`` (the grid and its runs; ``python -m ...gradient_flow.sweep``), ``tuning``
(learning-rate grids and chosen rates), ``records`` (what each run directory holds),
``stats`` (Kendall's tau, bootstrap CIs, verdicts), ``findings`` (the paper's claims
tested on the records), ``plots``, ``formatting`` and ``report`` (the markdown;
``python -m ...gradient_flow.report``).
"""
