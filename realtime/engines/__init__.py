"""Engine runtimes: the manifest that describes an exported engine, the engine interface every runtime offers, ONNX
Runtime, TensorRT and torch.export runtimes picked from a table by the loader, and the watcher that hot-swaps to a newer
version in the registry. Loads artifacts only, never model or training code."""
