"""Open an engine directory with a named runtime, picked from a table of modules.

The table names each runtime's module and class; the loader imports only the one asked for, so
opening an ONNX engine never imports torch or TensorRT, and no runtime module imports the loader.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from loopcast.realtime.engines.base import Engine, resolve_engine
from loopcast.realtime.engines.manifest import EngineError, EngineManifest

RUNTIMES = ("auto", "onnxruntime", "tensorrt", "torch")
# runtime -> (module, class); "auto" resolves to one of the others first
_RUNTIME_TABLE = {"onnxruntime": ("loopcast.realtime.engines.onnx_runtime", "OnnxEngine"),
                  "tensorrt": ("loopcast.realtime.engines.tensorrt", "TensorRTEngine"),
                  "torch": ("loopcast.realtime.engines.torch_runtime", "TorchEngine")}


def load_engine(path: str | Path, runtime: str = "onnxruntime", threads: int = 1,
                device: str = "cpu", memory_arena: bool = True, precision: str = "fp32") -> Engine:
    """Open an engine with the named runtime on `device` ('cpu' or 'cuda').

    'onnxruntime' runs the ONNX file; 'tensorrt' the fp16 plan (built from the ONNX file on first use
    and cached beside it; CUDA only; trace engines only); 'torch' the saved torch.export program; 'auto'
    picks TensorRT on CUDA when importable (trace engines), else ONNX Runtime. `memory_arena` is ONNX
    Runtime's CPU arena: on, it keeps the largest call's buffers for reuse (faster); off, a large
    engine's peak goes back to the OS after each call. `precision` "bf16" runs the torch program under
    bfloat16 autocast (torch runtime only; TensorRT builds its own fp16 plan).
    """
    if runtime not in RUNTIMES:
        raise EngineError(f"unknown engine runtime {runtime!r}; available: {list(RUNTIMES)}")
    if runtime == "auto":
        trt = device.startswith("cuda") and _importable("tensorrt")
        runtime = "tensorrt" if trt and EngineManifest.load(resolve_engine(path)).task != "video" else "onnxruntime"
    if precision != "fp32" and runtime != "torch":
        raise EngineError(f"precision {precision!r} needs runtime 'torch' (runtime {runtime!r} runs the "
                          f"exported fp32 graph; TensorRT builds its own fp16 plan)")
    module, cls = _RUNTIME_TABLE[runtime]
    engine_cls = getattr(importlib.import_module(module), cls)
    engine: Engine
    if runtime == "onnxruntime":
        engine = engine_cls(path, threads=threads, device=device, memory_arena=memory_arena)
    elif runtime == "tensorrt":
        engine = engine_cls(path, device=device)
    else:
        engine = engine_cls(path, threads=threads, device=device, precision=precision)
    return engine


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
