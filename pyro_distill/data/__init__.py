"""Data: shipped tabular sets (digits, synthetic), file loaders, and generated sequence tasks."""

from .tabular import Dataset, digits, subsample, synthetic_classification, synthetic_regression

__all__ = ["Dataset", "digits", "subsample", "synthetic_classification", "synthetic_regression"]
