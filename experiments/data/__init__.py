"""Data for the experiments: ``input_pipeline`` (TFDS sets, batches, preprocessing)
and the offline dataset builders (``mnist5k``, ``bytes_pydoc``, ``synthetic``).

Each builder makes its data set from files available offline (no network access).
"""
