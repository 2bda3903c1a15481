"""Causal spike inference accuracy on held-out simulated ground truth, per SNR level.

For each SNR a fresh synthetic recording (seeds never used for training) goes through the online causal
dF/F; every method then estimates spikes per frame and is scored by the per-neuron Pearson correlation
with the true spike counts (median over neurons that spiked; frames after the OASIS warm-up):
  naive_diff       positive first difference of dF/F (the baseline both methods must beat)
  ar1_threshold    the skeleton's one-step AR(1) inversion
  oasis_lag0/lag2  streaming OASIS, strictly causal / allowed 2 frames of look-back (~1.8 s later)
  oasis_offline    OASIS on the whole trace (non-causal; parameters from the whole trace)
  spikenet         the learned causal net through the engine runtime (--spike-engine)
Also r after a [1/4, 1/2, 1/4] smoothing of both series ("+-1 frame"), the usual leniency for
frame-level timing. Writes bench/results/spike-accuracy-<date>-<host>.json and docs/figures/spike_accuracy.png.

    .venv/bin/python bench/spike_accuracy.py [--spike-engine engines/spikenet-c32-h1] [--snrs 2,4,8]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from loopcast.offline_training.eval.metrics import column_r
from loopcast.realtime.preprocess.dff import DffConfig, causal_dff
from loopcast.realtime.spikes.oasis import OasisConfig, StreamingOasis, estimate_params, oasis_offline
from loopcast.realtime.spikes.stage import CausalSpikes, SpikeConfig
from loopcast.replay.fish import FishConfig
from loopcast.replay.synth import SynthConfig, synthesize

from common import write_result

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "spike_accuracy.png"
HELD_OUT_SEED = 9000           # training (offline_training/spikes/train.py) uses small seeds


def smooth(x: np.ndarray) -> np.ndarray:
    y = 0.5 * x
    y[1:] += 0.25 * x[:-1]
    y[:-1] += 0.25 * x[1:]
    return y


def streaming(dff: np.ndarray, period_s: float, lag: int) -> np.ndarray:
    cfg = OasisConfig(lag=lag)
    params, _ = estimate_params(dff[:cfg.warmup], period_s, cfg)
    o = StreamingOasis(dff.shape[1], params, cfg)
    out = np.stack([o.process(row) for row in dff])               # row t = estimate for frame t - lag
    return np.concatenate([out[lag:], np.zeros((lag, dff.shape[1]), np.float32)])   # aligned to frames


def offline(dff: np.ndarray, period_s: float) -> np.ndarray:
    params, _ = estimate_params(dff, period_s, OasisConfig())
    return oasis_offline(dff, params.g, params.smin, params.baseline)[1]


def ar1(dff: np.ndarray, period_s: float, dff_per_spike: float) -> np.ndarray:
    s = CausalSpikes(dff.shape[1], SpikeConfig(method="ar1_threshold", dff_per_spike=dff_per_spike), period_s)
    return np.stack([s.process(row).count for row in dff])


def spikenet(dff: np.ndarray, engine_path: str) -> np.ndarray:
    from loopcast.realtime.engines.loader import load_engine
    engine = load_engine(engine_path, threads=2)
    c = engine.manifest.context
    out = np.zeros_like(dff)
    for t in range(c - 1, len(dff)):
        out[t] = engine.run(np.ascontiguousarray(dff[t - c + 1:t + 1]))[0]
    return out


def evaluate(snr: float, args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    fish = FishConfig(seed=HELD_OUT_SEED + int(snr * 10), snr=snr, n_neurons=args.neurons)
    rec = synthesize(SynthConfig(fish=fish, n_frames=args.frames, write_raw=False), work / f"snr{snr:g}",
                     progress=False)
    dt = fish.frame_period_s
    dff = causal_dff(rec.raw_traces(), DffConfig())
    true = rec.ground_truth("spikes")
    est = {"naive_diff": np.maximum(np.diff(dff, axis=0, prepend=dff[:1]), 0),
           "ar1_threshold": ar1(dff, dt, args.dff_per_spike),
           "oasis_lag0": streaming(dff, dt, 0), "oasis_lag2": streaming(dff, dt, 2),
           "oasis_offline": offline(dff, dt)}
    if args.spike_engine:
        est["spikenet"] = spikenet(dff, args.spike_engine)
    start = OasisConfig().warmup
    active = true[start:].sum(0) > 0
    scores = {}
    for name, e in est.items():
        r = column_r(e[start:], true[start:])[active]
        rs = column_r(smooth(e[start:]), smooth(true[start:]))[active]
        scores[name] = {"median_r": float(np.nanmedian(r)), "q25_r": float(np.nanpercentile(r, 25)),
                        "q75_r": float(np.nanpercentile(r, 75)), "median_r_smoothed": float(np.nanmedian(rs))}
    return scores, {"neurons_scored": int(active.sum()), "frames_scored": int(args.frames - start)}


def figure(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snrs = list(results)
    methods = list(results[snrs[0]]["scores"])
    fig, ax = plt.subplots(figsize=(9, 4), constrained_layout=True)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        med = [results[s]["scores"][m]["median_r"] for s in snrs]
        lo = [med[i] - results[s]["scores"][m]["q25_r"] for i, s in enumerate(snrs)]
        hi = [results[s]["scores"][m]["q75_r"] - med[i] for i, s in enumerate(snrs)]
        ax.bar(np.arange(len(snrs)) + j * width, med, width, yerr=[lo, hi], label=m, capsize=2)
    ax.set_xticks(np.arange(len(snrs)) + 0.4 - width / 2, [f"SNR {s}" for s in snrs])
    ax.set(ylabel="Pearson r with true spikes (median, IQR)", title="causal spike inference, held-out fish")
    ax.legend(fontsize=8, ncol=3)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snrs", default="2,4,8")
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--neurons", type=int, default=3000)
    ap.add_argument("--dff-per-spike", type=float, default=0.08, help="for ar1_threshold (pipeline default)")
    ap.add_argument("--spike-engine", default="")
    ap.add_argument("--name", default="spike-accuracy")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for snr in (float(s) for s in args.snrs.split(",")):
            scores, info = evaluate(snr, args, Path(tmp))
            results[f"{snr:g}"] = {"scores": scores, **info}
            print(f"\nSNR {snr:g}: {info['neurons_scored']} neurons x {info['frames_scored']} frames")
            print(f"  {'method':<16}{'median r':>10}{'IQR':>16}{'r +-1 frame':>13}")
            for m, s in scores.items():
                print(f"  {m:<16}{s['median_r']:>10.3f}   [{s['q25_r']:.3f}, {s['q75_r']:.3f}]"
                      f"{s['median_r_smoothed']:>13.3f}")
    figure(results)
    path = write_result(args.name, {"frames": args.frames, "neurons": args.neurons, "held_out_seed": HELD_OUT_SEED,
                                    "spike_engine": args.spike_engine, "results": results,
                                    "figure": "docs/figures/spike_accuracy.png"})
    print(f"\nwrote {path} and {FIGURE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
