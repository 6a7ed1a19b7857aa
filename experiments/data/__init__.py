"""Data for the experiments: ``input_pipeline`` (TFDS sets, batches; the API the
trainer uses) with its parts ``specs``, ``builders``, ``ops`` and ``tf_import``, and
the offline dataset builders (``mnist5k``, ``bytes_pydoc``, ``synthetic``).

Each builder makes its data set from files available offline (no network access).
"""
