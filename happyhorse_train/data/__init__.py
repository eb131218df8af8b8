"""Data loading: datasets, bucketing and sampling for training."""
