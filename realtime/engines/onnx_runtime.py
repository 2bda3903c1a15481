"""The ONNX Runtime engine, on CPU or CUDA (onnxruntime-gpu): the default runtime of the loop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from loopcast.realtime.engines.base import EngineBase
from loopcast.realtime.engines.manifest import EngineError


class OnnxEngine(EngineBase):
    """ONNX Runtime engine on CPU or CUDA: (C, N) float32 context in, (H, N) float32 out (a forecast,
    or for a 'spikes' engine the current frame's expected spike counts, H = 1)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu", memory_arena: bool = True) -> None:
        super().__init__(path)
        onnx_path = self.manifest.file("onnx")
        if not onnx_path.is_file():
            raise EngineError(f"{self.manifest.path}: ONNX file {onnx_path.name} is missing")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = memory_arena   # off: buffers go back to the OS between calls
        self.device = device
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=ort_providers(device))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{onnx_path}: ONNX Runtime cannot load it ({exc})") from exc
        want = ({s.name for s in self.manifest.inputs}, {self._out})
        names = ({i.name for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()})
        if not (want[0] <= names[0] and want[1] <= names[1]):
            raise EngineError(f"{onnx_path}: graph IO {names} does not match the manifest {want}")

    def _infer(self, x: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        """extra: the second input (covariates, or a video engine's lead times), fed by its name."""
        feeds = {self._in: x} if extra is None else {self._in: x, self._extra: extra}
        y: np.ndarray = self.session.run([self._out], feeds)[0]
        return y


def ort_providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for 'cpu' or 'cuda' ('cuda[:k]' needs onnxruntime-gpu)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(f"device {device!r}: this onnxruntime has no CUDAExecutionProvider "
                              f"(available: {ort.get_available_providers()}; install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise EngineError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
