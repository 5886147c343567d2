"""Offline evaluation: temporal splits, top-K metrics, baselines."""
