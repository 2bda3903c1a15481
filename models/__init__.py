"""PyTorch modules and their typed configs: the trace baselines, linear, TSMixer and TiDE forecasters, the volumetric
video UNet, the Sparse Brain Model, QuantFormer, the causal spike net, and the model zoo that builds them by name.
Imports torch only."""
