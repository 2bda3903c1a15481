"""The learned causal spike net: training on simulated ground truth and scoring against OASIS and the first-
difference baseline.
"""
