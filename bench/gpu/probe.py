"""GPU diagnostics: where the time of a forward goes (torch.profiler top kernels) and what one 3-D
convolution of the video UNet's full-resolution stage achieves alone. Prints tables; writes nothing.

    python3 bench/gpu/probe.py video     # paper-width UNet at 512 x 288 x 72, bf16, one lead
    python3 bench/gpu/probe.py trace     # NLinear torch engine vs eager at 71,721 neurons
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[2]


def cuda_ms(fn, reps: int = 5) -> float:
    """Median CUDA-event milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def top(fn, n: int = 20) -> None:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70))


def conv_row(f: int, dt: torch.dtype, fmt: torch.memory_format, shape: tuple[int, int, int]) -> None:
    """One full-resolution conv3d, GroupNorm and SiLU alone; the tensors are freed on return."""
    conv = torch.nn.Conv3d(f, f, 3, padding=1).cuda().to(dt)
    conv = conv.to(memory_format=fmt)  # type: ignore[call-overload]  # documented; missing from torch's stubs
    x = torch.randn(1, f, *shape, device="cuda", dtype=dt).to(memory_format=fmt)
    with torch.inference_mode():
        ms = cuda_ms(lambda: conv(x))
    tflop = 2 * f * f * 27 * np.prod(shape) / 1e12
    print(f"conv3d {f}->{f} {dt} {fmt}: {ms:.2f} ms = {tflop / ms * 1e3:.0f} TFLOP/s")
    gn = torch.nn.GroupNorm(16, f).cuda().to(dt)
    with torch.inference_mode():
        print(f"  groupnorm {cuda_ms(lambda: gn(x)):.2f} ms")
        print(f"  silu {cuda_ms(lambda: torch.nn.functional.silu(x)):.2f} ms")


def video() -> None:
    from loopcast.models.video_unet import VideoUNet, VideoUNetConfig
    torch.backends.cudnn.benchmark = True
    shape = (512, 288, 72)
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        conv_row(128, torch.bfloat16, fmt, shape)
        torch.cuda.empty_cache()  # the full-resolution tensors are gone before the next format
    model = VideoUNet(VideoUNetConfig.paper(4, horizon=32, super_resolution=0)).cuda().eval()
    x = torch.randn(1, 4, *shape, device="cuda")
    lead = torch.ones(1, dtype=torch.int64, device="cuda")

    def fwd() -> None:
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            model(x, lead)
    print(f"paper UNet bf16 autocast, one lead: {cuda_ms(fwd, 3):.1f} ms")
    top(fwd)
    cl = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # missing from torch's stubs
    xcl = x.to(memory_format=torch.channels_last_3d)

    def fwd_cl() -> None:
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            cl(xcl, lead)
    print(f"paper UNet bf16 autocast channels-last, one lead: {cuda_ms(fwd_cl, 3):.1f} ms")
    top(fwd_cl)


def trace() -> None:
    import forecast_latency as fl

    from loopcast.offline_training.export.engine import export_engine
    from loopcast.offline_training.trace.train import TrainConfig
    from loopcast.realtime.engines.loader import load_engine
    from loopcast.realtime.engines.torch_runtime import TorchEngine

    import trace_windows
    n = 71721
    spec = [s for s in fl.specs(n, 32, {"nlinear"}) if s.context == 4][0]
    model = fl.build(spec, 0)
    x = np.random.default_rng(0).random((4, n), dtype=np.float32)
    d = export_engine(model, TrainConfig(model="nlinear", context=4, horizon=32, seed=0), tempfile.mkdtemp(),
                      n, metrics={}, data_fingerprint="probe", data_source="probe", parity_input=x,
                      tolerance=1e-4)
    e = load_engine(d, runtime="torch", device="cuda")
    assert isinstance(e, TorchEngine)
    eager = trace_windows.eager_fn(model.cuda(), "cuda")
    for name, fn in (("engine", lambda: e.run(x)), ("eager", lambda: eager(x, None))):
        for _ in range(10):
            fn()
        t = time.perf_counter()
        for _ in range(50):
            fn()
        print(f"{name}: {(time.perf_counter() - t) / 50 * 1e3:.2f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    print("param devices", {str(p.device) for p in e.module.parameters()},
          "buffers", {str(b.device) for b in e.module.buffers()})


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("video", "trace"):
        sys.exit("usage: bench/gpu/probe.py video|trace")
    if not torch.cuda.is_available():
        sys.exit("bench/gpu/probe.py profiles CUDA work: torch sees no GPU on this machine")
    {"video": video, "trace": trace}[sys.argv[1]]()
