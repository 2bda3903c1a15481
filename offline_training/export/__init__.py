"""Export: trained modules to ONNX (and torch.export) engines with manifests, and the engine registry's versioned
directories that the real-time side watches.
"""
