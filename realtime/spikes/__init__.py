"""Causal spike inference per neuron, one frame at a time: online OASIS (AR(1) deconvolution with per-neuron parameters
estimated from the first frames, numba and torch variants) or a learned causal spike net served as an engine; the stage
picks one from the config."""
