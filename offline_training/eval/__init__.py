"""Evaluation: the ZAPBench-style harness that scores engines on the test split (MAE per lead time against the
baselines), shared metrics such as per-neuron Pearson r, and the plots of the results.
"""
