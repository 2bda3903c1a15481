"""TensorRT runtime: a serialized fp16 plan built from the engine's ONNX file, served on CUDA.

The plan is `files["tensorrt"]` when the manifest lists one, else it is built once (ONNX parser ->
builder config with FP16 -> optimization profile: batch 1..max_batch, neurons fixed to N) and cached
beside the ONNX file as `model.fp16.n<N>.plan`. TensorRT 11 removed the FP16 builder flag (networks are
strongly typed): there the ONNX graph is first cast to fp16 with float32 inputs/outputs (`fp16_onnx`).
Before serving, the plan is checked against ONNX Runtime (CPU) on a seeded random batch within fp16
tolerance. Torch CUDA tensors are the device buffers and torch's current stream is the stream.
Optional: without `tensorrt` or CUDA it raises a clear EngineError.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.realtime.engines.base import EngineBase
from loopcast.realtime.engines.manifest import COVARIATES_INPUT, EngineError
from loopcast.realtime.engines.onnx_runtime import OnnxEngine

log = logging.getLogger(__name__)
TRT_FILE_KEY = "tensorrt"
PARITY_RTOL = 1e-2
PARITY_ATOL = 1e-2
PARITY_SEED = 0
PARITY_BATCH = 2
Inputs = tuple[np.ndarray, np.ndarray | None]


def import_tensorrt() -> Any:
    """The `tensorrt` module, or a clear EngineError saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"TensorRT is not installed (pip install tensorrt-cu12, or tensorrt-cu13 for "
                          f"CUDA 13; import failed: {exc}); use runtime 'onnxruntime' or 'torch'") from None
    return trt


def fp16_available(trt: Any) -> bool:
    """True where the builder takes BuilderFlag.FP16 (TensorRT <= 10; 11.x is strongly typed only, and
    build_plan casts the ONNX graph to fp16 instead)."""
    return hasattr(trt.BuilderFlag, "FP16")


def plan_name(n_neurons: int, fp16: bool = True) -> str:
    """The cached plan's file name, e.g. 'model.fp16.n16.plan'."""
    return f"model.{'fp16' if fp16 else 'fp32'}.n{n_neurons}.plan"


def build_plan(onnx_path: str | Path, plan_path: str | Path, n_neurons: int, max_batch: int = 8,
               fp16: bool = True) -> Path:
    """Build a serialized TensorRT engine from an ONNX file and write it (atomically) to plan_path."""
    trt = import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if max_batch < 1 or n_neurons < 1:
        raise EngineError(f"{onnx_path}: max_batch and n_neurons must be >= 1, got {max_batch}, {n_neurons}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = fp16 and not fp16_available(trt)
    if strongly_typed:  # TensorRT 11: precision comes from the graph's types, so cast the graph to fp16
        onnx_path = fp16_onnx(onnx_path)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    else:
        network = builder.create_network(0)  # explicit batch (the only mode in TensorRT >= 10)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: the TensorRT ONNX parser rejected it ({errors})")
    config = builder.create_builder_config()
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    config.add_optimization_profile(_profile(builder, network, n_neurons, max_batch, onnx_path))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build a plan (see the TensorRT log)")
    _write_atomic(plan_path, plan)
    return plan_path


def fp16_onnx(onnx_path: Path) -> Path:
    """A copy of the graph with fp16 weights and arithmetic but float32 inputs and outputs (for a
    strongly typed TensorRT network), written once beside the original as model.fp16.onnx."""
    out = onnx_path.with_name(onnx_path.stem + ".fp16.onnx")
    if out.is_file() and out.stat().st_mtime >= onnx_path.stat().st_mtime:
        return out
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    _write_atomic(out, model.SerializeToString())
    return out


def _profile(builder: Any, network: Any, n_neurons: int, max_batch: int, onnx_path: Path) -> Any:
    """Batch 1/1/max_batch on axis 0; any other dynamic axis (neurons) fixed to n_neurons."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if len(dims) != 3 or dims[1] < 0:
            raise EngineError(f"{onnx_path}: input {tensor.name!r} must be [batch, steps, features] with "
                              f"fixed steps, got {dims}")
        rest = tuple(n_neurons if d < 0 else d for d in dims[1:])
        lo, hi = (1, max_batch) if dims[0] < 0 else (dims[0], dims[0])
        profile.set_shape(tensor.name, (lo, *rest), (lo, *rest), (hi, *rest))
    return profile


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes to a temp file beside `path`, then os.replace it into place."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise EngineError(f"{path}: cannot write the TensorRT plan ({exc}); make the engine directory "
                          f"writable or list a prebuilt plan as files['tensorrt']") from None


def check_trt_parity(engine: Any, reference_outputs: Sequence[np.ndarray], inputs: Sequence[Inputs],
                     rtol: float = PARITY_RTOL, atol: float = PARITY_ATOL) -> float:
    """Max abs diff of `engine.run_batch(x, cov)` vs the reference outputs; EngineError when any element
    is off by more than atol + rtol * |reference| (fp16 tolerance), or NaN."""
    where = getattr(engine, "plan_path", None) or getattr(engine, "version", "engine")
    if len(reference_outputs) != len(inputs):
        raise EngineError(f"{where}: {len(reference_outputs)} reference outputs for {len(inputs)} inputs")
    worst = 0.0
    for want, (x, cov) in zip(reference_outputs, inputs):
        got = engine.run_batch(x, cov)
        if got.shape != want.shape:
            raise EngineError(f"{where}: TensorRT output shape {got.shape} != reference {want.shape}")
        diff = np.abs(got.astype(np.float64) - want)
        worst = max(worst, float(np.max(diff)))
        if not np.all(diff <= atol + rtol * np.abs(want)):  # also catches NaN
            raise EngineError(f"{where}: TensorRT vs ONNX Runtime (CPU) max abs diff {worst:.3g} exceeds the "
                              f"fp16 tolerance (rtol={rtol:g}, atol={atol:g})")
    return worst


def parity_batch(engine: EngineBase, batch: int = PARITY_BATCH, seed: int = PARITY_SEED) -> Inputs:
    """A seeded random (context, covariates) batch for `engine` (covariates None without them)."""
    m, rng = engine.manifest, np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, size=(batch, m.context, engine.n_neurons)).astype(np.float32)
    if not m.n_covariates:
        return x, None
    cov = rng.normal(0.0, 1.0, size=(batch, m.context + m.horizon, m.n_covariates)).astype(np.float32)
    return x, cov


class TensorRTEngine(EngineBase):
    """An engine served by TensorRT on CUDA from its (cached) plan, parity-checked against ORT CPU."""

    runtime = "tensorrt"

    def __init__(self, path: str | Path, device: str = "cuda", max_batch: int = 8,
                 rtol: float = PARITY_RTOL, atol: float = PARITY_ATOL) -> None:
        super().__init__(path)
        if self.manifest.task == "video":
            raise EngineError(f"engine {self.version}: the TensorRT runtime serves trace engines only; run "
                              f"video engines with runtime 'torch' (CUDA, bf16) or 'onnxruntime'")
        if not device.startswith("cuda"):
            raise EngineError(f"engine {self.version}: the TensorRT runtime needs a CUDA device, got "
                              f"device={device!r} (pass device 'cuda')")
        self._trt = import_tensorrt()
        self._torch = _cuda_torch(device)
        self.device = self._torch.device(device)
        self.max_batch, self.rtol, self.atol = max_batch, rtol, atol
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._plan_n = 0
        self._open(self.n_neurons)

    def check_neurons(self, n: int) -> None:
        """As EngineBase; an any-N engine switches to (building if needed) the plan for the new N."""
        super().check_neurons(n)
        if self.n_neurons != self._plan_n:
            self._open(self.n_neurons)

    def _open(self, n: int) -> None:
        """Find or build the plan for N = n, load it, and check parity before serving."""
        m = self.manifest
        prebuilt = TRT_FILE_KEY in m.files and n == m.n_neurons
        cached = m.file("onnx").parent / plan_name(n)
        plan = m.file(TRT_FILE_KEY) if prebuilt else cached
        if prebuilt and not plan.is_file():
            raise EngineError(f"{m.path}: TensorRT plan {plan.name} is missing")
        if not plan.is_file():
            log.info("engine %s: building TensorRT plan %s (once; cached)", self.version, plan)
            build_plan(m.file("onnx"), plan, n, self.max_batch)
        try:
            self._load(plan, n)
        except EngineError as exc:
            if prebuilt:
                raise
            log.warning("%s; rebuilding the cached plan", exc)  # e.g. built by another TensorRT or GPU
            build_plan(m.file("onnx"), plan, n, self.max_batch)
            self._load(plan, n)
        self.plan_path, self._plan_n = plan, n
        self.parity = self._check_parity()

    def _load(self, plan: Path, n: int) -> None:
        """Deserialize the plan, check its IO against the manifest, allocate max-batch buffers."""
        trt, torch = self._trt, self._torch
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(self._logger)
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise EngineError(f"{plan}: TensorRT cannot deserialize this plan (another TensorRT or GPU?)")
            names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            want = {s.name for s in self.manifest.inputs} | {self._out}
            if names != want or any(engine.get_tensor_dtype(k) != trt.DataType.FLOAT for k in names):
                raise EngineError(f"{plan}: plan IO {sorted(names)} is not float32 {sorted(want)} "
                                  f"(the manifest's)")
            self._max_batch = int(engine.get_tensor_profile_shape(self._in, 0)[2][0])
            self._runtime, self._engine = runtime, engine
            self._context = engine.create_execution_context()
            self._buffers = self._allocate(n)

    def _allocate(self, n: int) -> dict[str, Any]:
        """One (max_batch, ...) float32 CUDA buffer per IO tensor, its address bound once."""
        m, torch = self.manifest, self._torch
        shapes = {self._in: (m.context, n), self._out: (m.output_rows, n)}
        if m.n_covariates:
            shapes[COVARIATES_INPUT] = (m.context + m.horizon, m.n_covariates)
        buffers = {}
        for name, shape in shapes.items():
            buffers[name] = torch.empty((self._max_batch, *shape), dtype=torch.float32, device=self.device)
            if not self._context.set_tensor_address(name, buffers[name].data_ptr()):
                raise EngineError(f"engine {self.version}: TensorRT rejected the address of {name!r}")
        return buffers

    def _check_parity(self) -> dict[str, Any]:
        """Compare with ONNX Runtime (CPU) on a seeded random batch; EngineError past tolerance."""
        reference = OnnxEngine(self.path, threads=1, device="cpu")
        reference.check_neurons(self.n_neurons)
        inputs = parity_batch(self, batch=min(PARITY_BATCH, self._max_batch))
        want = reference.run_batch(*inputs)
        reference.close()
        diff = check_trt_parity(self, [want], [inputs], self.rtol, self.atol)
        return {"max_abs_diff": diff, "rtol": self.rtol, "atol": self.atol, "reference": "onnxruntime-cpu"}

    def _infer(self, x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        step = self._max_batch
        outs = [self._infer_chunk(x[i:i + step], None if cov is None else cov[i:i + step])
                for i in range(0, len(x), step)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _infer_chunk(self, x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        torch, b = self._torch, len(x)
        feeds = {self._in: x} if cov is None else {self._in: x, COVARIATES_INPUT: cov}
        with torch.cuda.device(self.device):
            for name, a in feeds.items():
                self._buffers[name][:b].copy_(torch.from_numpy(a))
                if not self._context.set_input_shape(name, tuple(a.shape)):
                    raise EngineError(f"engine {self.version}: TensorRT rejected {name!r} shape {a.shape}")
            stream = torch.cuda.current_stream(self.device)
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"{self.plan_path}: TensorRT execution failed for batch {b}")
            y: np.ndarray = self._buffers[self._out][:b].cpu().numpy()  # a blocking copy: waits on the stream
            return y

    def close(self) -> None:
        """Release the execution context, engine and device buffers."""
        self._buffers, self._context, self._engine, self._runtime = {}, None, None, None


def _cuda_torch(device: str) -> Any:
    """torch, when it sees a CUDA device; else a clear EngineError."""
    try:
        import torch
    except ImportError as exc:
        raise EngineError(f"the TensorRT runtime uses torch CUDA tensors; torch is not installed "
                          f"({exc})") from None
    if not torch.cuda.is_available():
        raise EngineError(f"the TensorRT runtime needs a CUDA device; torch sees none (device={device!r}, "
                          f"torch {torch.__version__})")
    return torch
