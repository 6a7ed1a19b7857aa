"""Local TFDS dataset builders used by the experiment suite.

Each sub-package holds one `tfds.core.GeneratorBasedBuilder` that builds its
data set from files available offline (no network access is needed).
"""
