"""The Sparse Brain Model and its population-neuron baseline: training on the loop's spike probabilities, the fit
routine, rollout evaluation and calibration.
"""
