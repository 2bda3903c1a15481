"""Online rigid registration: cost per frame (estimate + shifted traces) and shift accuracy over SNR.

Cost: synthetic volumes (smoothed sparse points + noise, uint16) and a synthetic segmentation (N neurons,
each the inner 3x3x2 voxels of a random 4x4x2 cell), shifted by random sub-voxel amounts; the reference is
built from `warmup_frames` volumes first. Scales: demo 128 x 96 x 16 with 3000 neurons, and ZAPBench at the
4x-downsampled level 512 x 288 x 72 with 70k neurons, with the estimate's x/y stride 1 and 2 (`--zap-raw`
adds raw 2048 x 1152 x 72 with stride 4). Accuracy: analytic Gaussian blobs moved by random sub-voxel
shifts (|dx|, |dy| <= 3, |dz| <= 1.5) plus Gaussian noise of std peak / SNR: median abs error per axis,
at 128 x 96 x 16 with stride 1 and 2.

    python bench/registration.py [--frames 60] [--zap-raw]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from loopcast.realtime.preprocess.registration import RegistrationConfig, ShiftEstimator
from loopcast.realtime.preprocess.shifted_traces import ShiftedTraces
from loopcast.realtime.preprocess.traces import TraceExtractor

from common import print_table, quantiles, write_result

Shape = tuple[int, int, int]


def cell_segmentation(shape: Shape, n: int, seed: int) -> np.ndarray:
    """Labels 1..n: the inner 3x3x2 voxels of n random cells of a 4x4x2 grid."""
    rng = np.random.default_rng(seed)
    cells = (shape[0] // 4, shape[1] // 4, shape[2] // 2)
    pick = rng.choice(int(np.prod(cells)), n, replace=False)
    cx, cy, cz = np.unravel_index(pick, cells)
    seg = np.zeros(shape, np.int32)
    for dx in range(3):
        for dy in range(3):
            for dz in range(2):
                seg[cx * 4 + dx, cy * 4 + dy, cz * 2 + dz] = np.arange(1, n + 1)
    return seg


def volumes(shape: Shape, count: int, seed: int, max_shift: tuple[float, float, float]) -> list[np.ndarray]:
    """`count` uint16 volumes: one smooth base moved by random sub-voxel shifts (Fourier), plus noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros(shape, np.float32)
    base.reshape(-1)[rng.choice(base.size, base.size // 200, replace=False)] = 4000.0
    base = gaussian_filter(base, (2.0, 2.0, 0.8))
    spec = np.fft.rfftn(base)
    freqs = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), np.fft.rfftfreq(shape[2]), indexing="ij")
    out = []
    for _ in range(count):
        d = rng.uniform(-np.array(max_shift), max_shift)
        ramp = np.exp(-2j * np.pi * sum(f * s for f, s in zip(freqs, d, strict=True)))
        moved = np.fft.irfftn(spec * ramp, s=shape, axes=(0, 1, 2)) + 100 + rng.normal(0, 20, shape)
        out.append(np.clip(moved, 0, 65535).astype(np.uint16))
    return out


def time_scale(shape: Shape, n_neurons: int, frames: int, cfg: RegistrationConfig) -> dict[str, Any]:
    """p50/p99/max of estimate, shifted traces and their sum (plus plain traces for comparison)."""
    seg = cell_segmentation(shape, n_neurons, 0)
    extractor = TraceExtractor(seg)
    shifted = ShiftedTraces(extractor)
    est = ShiftEstimator(shape, cfg)
    vols = volumes(shape, min(frames, 12), 1, (2.0, 2.0, 1.0))
    for v in vols[:cfg.warmup_frames]:
        est.add_reference_frame(v)
    for v in vols[:3]:                                   # compile / warm every kernel
        shifted.process(v, est.estimate(v))
        extractor.process(v)
    t_est, t_tr, t_plain = [], [], []
    for i in range(frames):
        v = vols[i % len(vols)]
        t0 = time.perf_counter()
        shift = est.estimate(v)
        t1 = time.perf_counter()
        shifted.process(v, shift)
        t2 = time.perf_counter()
        extractor.process(v)
        t_est.append(t1 - t0)
        t_tr.append(t2 - t1)
        t_plain.append(time.perf_counter() - t2)
    e, t = np.array(t_est), np.array(t_tr)
    return {"shape": list(shape), "neurons": n_neurons, "voxels": extractor.n_voxels, "stride": list(cfg.stride),
            "estimate": quantiles(e), "shifted_traces": quantiles(t), "total": quantiles(e + t),
            "plain_traces": quantiles(np.array(t_plain))}


def accuracy(snrs: tuple[float, ...], trials: int, seed: int, stride: int = 1) -> dict[str, Any]:
    """Median abs shift error per axis at each SNR (analytic blobs, 20-frame reference, no refresh)."""
    shape: Shape = (128, 96, 16)
    rng = np.random.default_rng(seed)
    centres = rng.uniform([6, 6, 3], [122, 90, 13], (400, 3))
    amp = rng.uniform(0.5, 1.5, 400)

    def render(d: np.ndarray) -> np.ndarray:
        gs = [np.exp(-0.5 * ((np.arange(n)[None, :] - (centres[:, k:k + 1] + d[k])) / s) ** 2)
              for k, (n, s) in enumerate(zip(shape, (2.0, 2.0, 1.0), strict=True))]
        return np.einsum("b,bx,by,bz->xyz", amp, *gs)

    ref, out = render(np.zeros(3)), dict[str, Any]()
    for snr in snrs:
        est = ShiftEstimator(shape, RegistrationConfig(refresh_rate=0.0, stride=(stride, stride)))
        for _ in range(est.cfg.warmup_frames):
            est.add_reference_frame(ref + rng.normal(0, 1 / snr, shape))
        errs, confs = [], []
        for _ in range(trials):
            d = rng.uniform([-3, -3, -1.5], [3, 3, 1.5])
            s = est.estimate(render(d) + rng.normal(0, 1 / snr, shape))
            errs.append(np.abs(s.as_array() - d))
            confs.append(s.confidence)
        med = np.median(errs, axis=0)
        out[str(snr)] = {"median_abs_error": dict(zip("xyz", med.tolist(), strict=True)),
                         "p90_abs_error": dict(zip("xyz", np.percentile(errs, 90, axis=0).tolist(), strict=True)),
                         "median_confidence": float(np.median(confs))}
    out["noise_confidence"] = float(est.estimate(rng.normal(0, 1, shape)).confidence)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--trials", type=int, default=40, help="shifts per SNR for the accuracy table")
    ap.add_argument("--zap-raw", action="store_true", help="also time raw 2048 x 1152 x 72 (stride 4)")
    ap.add_argument("--name", default="registration")
    args = ap.parse_args()
    cfg = RegistrationConfig(warmup_frames=10)
    scales = {"demo": time_scale((128, 96, 16), 3000, args.frames, cfg),
              "zapbench_ds4": time_scale((512, 288, 72), 70_000, args.frames, cfg),
              "zapbench_ds4_s2": time_scale((512, 288, 72), 70_000, args.frames,
                                            RegistrationConfig(warmup_frames=10, stride=(2, 2)))}
    if args.zap_raw:
        scales["zapbench_raw_s4"] = time_scale((2048, 1152, 72), 70_000, args.frames,
                                               RegistrationConfig(warmup_frames=10, stride=(4, 4)))
    for name, res in scales.items():
        print_table(f"{name}: {res['shape']} {res['neurons']} neurons, stride {res['stride']}",
                    {k: res[k] for k in ("estimate", "shifted_traces", "total", "plain_traces")})
    acc = {f"stride{k}": accuracy((2.0, 4.0, 8.0), args.trials, 7, k) for k in (1, 2)}
    print(f"\naccuracy (median abs error, voxels)\n{'stride':<8}{'SNR':<6}{'x':>8}{'y':>8}{'z':>8}{'conf':>8}")
    for name, res in acc.items():
        for snr in ("2.0", "4.0", "8.0"):
            m = res[snr]["median_abs_error"]
            print(f"{name:<8}{snr:<6}{m['x']:>8.3f}{m['y']:>8.3f}{m['z']:>8.3f}{res[snr]['median_confidence']:>8.1f}")
        print(f"{name}: pure-noise confidence {res['noise_confidence']:.1f}")
    path = write_result(args.name, {"frames": args.frames, "config": cfg.__dict__, "scales": scales,
                                    "accuracy": acc})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
