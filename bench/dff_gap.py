"""What real time costs: causal dF/F (trailing window) against ZAPBench's centred dF/F on a synthetic recording.

Both use the same percentile and window; the causal F0 at frame t sees only frames <= t, the centred F0
sees t-W .. t+W. Reports the gap between them (MAE overall, during warm-up and after), and how well
each follows the simulator's true dF/F (per-neuron Pearson r with dff_per_spike x calcium, which the
measurement scales down by the camera offset, hence correlation rather than error). Writes
bench/results/dff-gap-<date>-<host>.json and docs/figures/dff_gap.png.

    .venv/bin/python bench/dff_gap.py [--frames 2400] [--neurons 3000] [--snr 4]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from loopcast.config import to_dict
from loopcast.offline_training.eval.metrics import column_r
from loopcast.realtime.preprocess.dff import DffConfig, causal_dff, centered_dff
from loopcast.replay.fish import FishConfig
from loopcast.replay.synth import SynthConfig, synthesize

from common import write_result

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "dff_gap.png"


def rowwise_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r per column (0 where either column is constant)."""
    return column_r(a, b, fill=0.0)


def measure(raw: np.ndarray, truth: np.ndarray, cfg: DffConfig) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    causal = causal_dff(raw, cfg)
    t1 = time.perf_counter()
    centred = centered_dff(raw, cfg)
    t2 = time.perf_counter()
    gap = np.abs(causal - centred)                                   # (T, N)
    w = cfg.window
    stats = {"mae": float(gap.mean()), "mae_first_window": float(gap[:w].mean()),
             "mae_after_window": float(gap[w:].mean()) if len(gap) > w else None,
             "p99_abs": float(np.percentile(gap, 99)),
             "median_r_causal_truth": float(np.median(rowwise_r(causal, truth))),
             "median_r_centred_truth": float(np.median(rowwise_r(centred, truth))),
             "median_r_causal_centred": float(np.median(rowwise_r(causal, centred))),
             "causal_s": t1 - t0, "centred_s": t2 - t1}
    return stats, {"causal": causal, "centred": centred, "gap": gap}


def figure(raw: np.ndarray, truth: np.ndarray, arrays: dict, cfg: DffConfig, period_s: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causal, centred, gap = arrays["causal"], arrays["centred"], arrays["gap"]
    i = int(np.argsort(gap.mean(0))[len(gap[0]) // 2])              # a neuron with the median gap
    t = np.arange(len(raw)) * period_s / 60.0
    fig, ax = plt.subplots(2, 2, figsize=(12, 7), constrained_layout=True)
    f0c = raw[:, i] / (1 + causal[:, i])
    f0z = raw[:, i] / (1 + centred[:, i])
    ax[0, 0].plot(t, raw[:, i], lw=0.5, c="0.6", label="F (segment mean)")
    ax[0, 0].plot(t, f0c, c="C0", label="F0 causal (trailing)")
    ax[0, 0].plot(t, f0z, c="C1", label="F0 centred (ZAPBench)")
    ax[0, 0].set(title=f"neuron {i}: baselines", xlabel="min", ylabel="counts")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].plot(t, centred[:, i], c="C1", lw=0.7, label="centred")
    ax[0, 1].plot(t, causal[:, i], c="C0", lw=0.7, label="causal")
    ax[0, 1].set(title=f"neuron {i}: dF/F", xlabel="min")
    ax[0, 1].legend(fontsize=8)
    ax[1, 0].plot(t, gap.mean(1), c="k", lw=0.7)
    ax[1, 0].axvspan(0, cfg.window * period_s / 60.0, color="C3", alpha=0.1, label="first window (warm-up)")
    ax[1, 0].set(title="|causal - centred| mean over neurons", xlabel="min", ylabel="dF/F")
    ax[1, 0].legend(fontsize=8)
    ax[1, 1].hist(rowwise_r(causal, truth), bins=50, alpha=0.6, label="causal")
    ax[1, 1].hist(rowwise_r(centred, truth), bins=50, alpha=0.6, label="centred")
    ax[1, 1].set(title="per-neuron r with true dF/F", xlabel="Pearson r", ylabel="neurons")
    ax[1, 1].legend(fontsize=8)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2400)
    ap.add_argument("--neurons", type=int, default=3000)
    ap.add_argument("--snr", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--name", default="dff-gap")
    args = ap.parse_args()
    fish = FishConfig(seed=args.seed, n_neurons=args.neurons, snr=args.snr)
    cfg = DffConfig()
    with tempfile.TemporaryDirectory() as tmp:
        rec = synthesize(SynthConfig(fish=fish, n_frames=args.frames, write_raw=False), Path(tmp) / "rec")
        raw, calcium = rec.raw_traces(), rec.ground_truth("calcium")
    truth = fish.dff_per_spike * calcium
    stats, arrays = measure(raw, truth, cfg)
    figure(raw, truth, arrays, cfg, fish.frame_period_s)
    print(f"\ncausal vs centred dF/F, {args.neurons} neurons x {args.frames} frames, window {cfg.window}")
    for k, v in stats.items():
        print(f"  {k:<26}{v if v is None else f'{v:.4f}'}")
    path = write_result(args.name, {"frames": args.frames, "neurons": args.neurons, "snr": args.snr,
                                    "seed": args.seed, "dff": to_dict(cfg),
                                    "results": stats, "figure": str(FIGURE.relative_to(FIGURE.parents[2]))})
    print(f"wrote {path} and {FIGURE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
