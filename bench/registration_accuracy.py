"""Online registration on the moving synthetic fish: shift error against the true shift, and trace quality.

For each SNR (FishConfig.snr: the median over neurons of one isolated spike's peak change of the segment-mean
trace over that trace's noise std at rest, replay/render.py trace_snr) and each motion setting
  still        motion off (the estimator's noise floor on a fish that does not move)
  drift        configs/motion.toml's drift speeds, no jumps
  drift_jumps  configs/motion.toml as is (seed 0: one jump, first seen at frame 101, in 300 frames)
  fast_drift   5x configs/motion.toml's drift speeds, no jumps
the demo fish (FishConfig's default shape 128 x 96 x 16, 3000 neurons, seed 0) runs `--frames` frames. The
reference is the first `warmup_frames` volumes (add_reference_frame); every later volume is estimated.
Shift error: estimated - (true - origin), origin = the mean true shift over the warm-up frames (the
reference's own position); the JSON also has the median of (true - estimated) over the run for comparison,
and the "integer pull" k per axis (error ~ -k x the true shift's distance from a whole voxel).
Traces: per-neuron Pearson r with the true calcium (frame.calcium; dF/F is dff_per_spike x calcium, same r)
over the frames after warm-up, of (a) the moving volume through the fixed segmentation (`none`), (b) through
the estimated shift (`online`, ShiftedTraces, trilinear), (b') through the estimated shift rounded to whole
voxels (`online_int`), (c) through the true shift (`true_shift`, the trilinear ceiling) and (d) the same
fish (same seed, same spikes) with motion off (`still`). Registration: RegistrationConfig() (the defaults).
Sub-voxel loss: the median trace of a still frame moved by fixed shifts as the renderer moves the fish,
read without and with the true shift, over the unshifted trace (what no registration can recover).

Writes bench/results/registration-accuracy-<date>-<host>.json and docs/figures/registration.png.

    .venv/bin/python bench/registration_accuracy.py [--frames 300] [--snrs 2,4,8]
"""
from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.config import from_dict, load_toml, to_dict
from loopcast.realtime.preprocess.registration import RegistrationConfig, ShiftEstimator
from loopcast.realtime.preprocess.shifted_traces import ShiftedTraces
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.replay.fish import FishConfig, FishModel, stimulus_schedule
from loopcast.replay.motion import MotionConfig, RigidMotion
from loopcast.replay.render import shift_volume

from common import print_table, quantiles, write_result

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "figures" / "registration.png"
MOTION_TOML = ROOT / "configs" / "motion.toml"
FAST_DRIFT = 5.0
TRACES = ("none", "online", "online_int", "true_shift", "still")
SUBVOXEL = ((0.25, 0.0, 0.0), (0.5, 0.0, 0.0), (0.0, 0.0, 0.25), (0.0, 0.0, 0.5), (0.5, 0.5, 0.5), (1.0, 0.0, 0.0))
AXES = "xyz"
LABELS = {"none": "no correction", "online": "estimated shift (trilinear)",
          "online_int": "estimated shift, whole voxels", "true_shift": "true shift (trilinear)",
          "still": "fish not moving"}


@dataclass
class Session:
    """One run of the fish: true and estimated shifts, confidences, calcium, traces and per-frame cost."""

    true: np.ndarray                  # (T, 3) true shift, voxels
    est: np.ndarray                   # (T, 3) estimated shift (nan during warm-up)
    conf: np.ndarray                  # (T,) confidence (nan during warm-up)
    calcium: np.ndarray               # (T, N) true calcium
    traces: dict[str, np.ndarray]     # "none", "online", "online_int", "true_shift": (T, N) float32
    cost: dict[str, list[float]]      # seconds per frame: estimate, shifted_traces, plain_traces
    warmup: int


def motion_settings() -> dict[str, MotionConfig]:
    """still, drift, drift_jumps and fast_drift, from configs/motion.toml."""
    base = from_dict(MotionConfig, load_toml(MOTION_TOML)["synth"]["fish"]["motion"], "synth.fish.motion")
    dx, dy, dz = base.drift_speed
    fast = (FAST_DRIFT * dx, FAST_DRIFT * dy, FAST_DRIFT * dz)
    return {"still": MotionConfig(), "drift": replace(base, jump_rate=0.0), "drift_jumps": base,
            "fast_drift": replace(base, jump_rate=0.0, drift_speed=fast)}


def jump_frames(motion: MotionConfig, n_frames: int) -> list[int]:
    """Frames whose shift first includes a jump (the motion's stream replayed)."""
    m, out = RigidMotion(motion), []
    for t in range(n_frames - 1):
        before = m.n_jumps
        m.next()
        if m.n_jumps > before:
            out.append(t + 1)
    return out


def run_session(fish_cfg: FishConfig, n_frames: int, reg: RegistrationConfig) -> Session:
    """Step the fish n_frames; reference from the first warm-up volumes, then estimate and read traces."""
    fish = FishModel(fish_cfg)
    cov = stimulus_schedule(fish_cfg, n_frames).covariates
    extractor = TraceExtractor(fish.anatomy.segmentation)
    shifted, est = ShiftedTraces(extractor), ShiftEstimator(fish_cfg.shape, reg)
    n = fish_cfg.n_neurons
    s = Session(np.zeros((n_frames, 3)), np.full((n_frames, 3), np.nan), np.full(n_frames, np.nan),
                np.zeros((n_frames, n), np.float32),
                {k: np.full((n_frames, n), np.nan, np.float32) for k in TRACES[:4]},
                {"estimate": [], "shifted_traces": [], "plain_traces": []}, reg.warmup_frames)
    buf = np.empty(fish_cfg.shape, np.uint16, order="F")
    for t in range(n_frames):
        frame = fish.step(cov[t], out=buf)
        s.true[t], s.calcium[t] = frame.shift, frame.calcium
        t0 = time.perf_counter()
        s.traces["none"][t] = extractor.process(frame.volume)
        if t:                                               # frame 0 compiles the kernel
            s.cost["plain_traces"].append(time.perf_counter() - t0)
        s.traces["true_shift"][t] = shifted.process(frame.volume, frame.shift.astype(np.float64))
        if t < reg.warmup_frames:
            est.add_reference_frame(frame.volume)
        else:
            _estimate(s, t, est, shifted, frame.volume)
    return s


def _estimate(s: Session, t: int, est: ShiftEstimator, shifted: ShiftedTraces, volume: np.ndarray) -> None:
    """Frame t after warm-up: its estimated shift and confidence, and traces through that shift (timed)."""
    t0 = time.perf_counter()
    shift = est.estimate(volume)
    t1 = time.perf_counter()
    s.traces["online"][t] = shifted.process(volume, shift)
    s.cost["estimate"].append(t1 - t0)
    s.cost["shifted_traces"].append(time.perf_counter() - t1)
    s.traces["online_int"][t] = shifted.process(volume, np.round(shift.as_array()))
    s.est[t], s.conf[t] = shift.as_array(), shift.confidence


def shift_stats(s: Session, min_conf: float) -> dict[str, Any]:
    """Abs error per axis (median, p95, max), bias, confidence quantiles, share of low-confidence frames."""
    w = s.warmup
    origin = s.true[:w].mean(axis=0)
    err_signed = s.est[w:] - (s.true[w:] - origin)
    err = np.abs(err_signed)
    conf = s.conf[w:]

    def per_axis(v: np.ndarray) -> dict[str, float]:
        return dict(zip(AXES, (float(x) for x in v)))

    return {"frames": int(len(conf)), "origin_warmup_mean": per_axis(origin),
            "origin_median_true_minus_est": per_axis(np.median(s.true[w:] - s.est[w:], axis=0)),
            "median_abs_error": per_axis(np.median(err, axis=0)),
            "p95_abs_error": per_axis(np.percentile(err, 95, axis=0)), "max_abs_error": per_axis(err.max(axis=0)),
            "true_range": per_axis(np.ptp(s.true, axis=0)),
            "integer_pull": integer_pull(s.true[w:] - origin, err_signed),
            "confidence_median": float(np.median(conf)), "confidence_p5": float(np.percentile(conf, 5)),
            "low_confidence_fraction": float(np.mean(conf < min_conf))}


def integer_pull(rel: np.ndarray, err: np.ndarray) -> dict[str, float | None]:
    """Per axis, k in err ~ -k (rel - round(rel)): how far estimates are pulled toward the nearest whole-voxel
    shift (0: unbiased, 1: snapped to it); None where the true fractional part hardly varies."""
    frac = rel - np.round(rel)
    return {a: float(-np.polyfit(frac[:, i], err[:, i], 1)[0]) if frac[:, i].std() > 0.05 else None
            for i, a in enumerate(AXES)}


def subvoxel_gain(snr: float) -> dict[str, dict[str, float]]:
    """Median over neurons of trace / unshifted trace for a still frame (offset removed) moved by fixed
    shifts the way the renderer moves the fish (replay.render.shift_volume), read without correction and
    through the true shift: the sub-voxel interpolation's loss, which no registration can undo."""
    cfg = FishConfig(snr=snr)
    fish = FishModel(cfg)
    extractor = TraceExtractor(fish.anatomy.segmentation)
    shifted = ShiftedTraces(extractor)
    mu = fish.step(stimulus_schedule(cfg, 50).covariates[0]).volume.astype(np.float32) - cfg.background_counts
    base = extractor.process(mu)
    out = {}
    for d in SUBVOXEL:
        moved = shift_volume(mu, d)
        out[",".join(f"{v:g}" for v in d)] = {
            "none": float(np.median(extractor.process(moved) / base)),
            "true_shift": float(np.median(shifted.process(moved, np.array(d)) / base))}
    return out


def neuron_r(traces: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) Pearson r of each column of traces (T, N) with truth's; nan where either is constant."""
    a = traces - traces.mean(axis=0, dtype=np.float64)
    b = truth - truth.mean(axis=0, dtype=np.float64)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=0) / den, np.nan)


def trace_rs(s: Session, still: Session) -> dict[str, np.ndarray]:
    """Per-neuron r with the true calcium after warm-up, per trace kind (still: the motion-off fish)."""
    w = s.warmup
    out = {k: neuron_r(s.traces[k][w:], s.calcium[w:]) for k in TRACES[:4]}
    out["still"] = neuron_r(still.traces["none"][w:], still.calcium[w:])
    return out


def r_summary(rs: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """median and p10 of per-neuron r (neurons with a non-constant calcium), per trace kind."""
    return {k: {"median": float(np.nanmedian(r)), "p10": float(np.nanpercentile(r, 10)),
                "neurons": int(np.isfinite(r).sum())} for k, r in rs.items()}


def print_shift_table(shifts: dict[str, dict[str, Any]], min_conf: float) -> None:
    print("\nshift error, |estimated - (true - warm-up mean true)|, voxels, frames after warm-up")
    print(f"{'motion':<12}{'SNR':>4} | {'median x/y/z':^20} | {'p95 x/y/z':^20} | {'max x/y/z':^20} |"
          f"{'conf p50':>9}{'conf p5':>8}{f'<{min_conf:g}':>7} | integer pull x/y/z")
    for key, r in shifts.items():
        motion, snr = key.rsplit("/", 1)
        cells = [" ".join(f"{r[q][a]:6.3f}" for a in AXES) for q in ("median_abs_error", "p95_abs_error",
                                                                    "max_abs_error")]
        print(f"{motion:<12}{snr:>4} | {cells[0]} | {cells[1]} | {cells[2]} |{r['confidence_median']:>9.1f}"
              f"{r['confidence_p5']:>8.1f}{100 * r['low_confidence_fraction']:>6.1f}% | "
              + " ".join("   -  " if r["integer_pull"][a] is None else f"{r['integer_pull'][a]:6.2f}" for a in AXES))


def print_gain_table(gain: dict[str, dict[str, float]]) -> None:
    print("\nsub-voxel loss: median trace / unshifted trace, a still frame moved as the renderer moves it")
    print(f"{'shift x,y,z':<16}{'none':>8}{'true_shift':>12}")
    for d, g in gain.items():
        print(f"{d:<16}{g['none']:>8.3f}{g['true_shift']:>12.3f}")


def print_trace_table(traces: dict[str, dict[str, dict[str, float]]]) -> None:
    print("\nper-neuron r(trace, true calcium) after warm-up: median / p10")
    print(f"{'motion':<12}{'SNR':>4}" + "".join(f"{k:>16}" for k in TRACES))
    for key, r in traces.items():
        motion, snr = key.rsplit("/", 1)
        print(f"{motion:<12}{snr:>4}" + "".join(f"{r[k]['median']:>9.3f} /{r[k]['p10']:>5.2f}" for k in TRACES))


def figure(s: Session, jumps: list[int], rs: dict[str, dict[str, np.ndarray]], snr: float,
           traces: dict[str, dict[str, dict[str, float]]]) -> None:
    """Top: true vs estimated shift per axis (drift_jumps, `snr`); bottom: r CDFs and median r vs SNR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    t, origin = np.arange(len(s.true)), s.true[:s.warmup].mean(axis=0)
    for a in range(3):
        _shift_panel(ax[0, a], t, s, a, origin, jumps)
    ax[0, 0].legend(fontsize=8, loc="best")
    for i, motion in enumerate(("drift_jumps", "fast_drift")):
        _cdf_panel(ax[1, i], rs.get(f"{motion}/{snr:g}", {}), f"{motion}, SNR {snr:g}")
    _snr_panel(ax[1, 2], traces)
    fig.suptitle("Online rigid registration on the synthetic demo fish (128 x 96 x 16, 3000 neurons)")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def _shift_panel(ax: Any, t: np.ndarray, s: Session, a: int, origin: np.ndarray, jumps: list[int]) -> None:
    ax.axvspan(0, s.warmup, color="0.9", label="warm-up (reference)")
    for j in jumps:
        ax.axvline(j, color="C3", ls="--", lw=0.8, label="jump" if j == jumps[0] else None)
    ax.plot(t, s.true[:, a] - origin[a], c="k", lw=1.2, label="true - reference origin")
    ax.plot(t, s.est[:, a], c="C0", lw=0.8, alpha=0.8, label="estimated")
    ax.set(title=f"{AXES[a]} shift (drift + jumps)", xlabel="frame", ylabel="shift (voxels)")


def _cdf_panel(ax: Any, rs: dict[str, np.ndarray], title: str) -> None:
    for k, label in LABELS.items():
        if k in rs:
            r = np.sort(rs[k][np.isfinite(rs[k])])
            ax.plot(r, np.arange(1, r.size + 1) / r.size, lw=1.2, ls=":" if k == "still" else "-", label=label)
    ax.set(title=f"per-neuron r(trace, true calcium): {title}", xlabel="Pearson r",
           ylabel="fraction of neurons (CDF)")
    ax.legend(fontsize=8, loc="upper left")


def _snr_panel(ax: Any, traces: dict[str, dict[str, dict[str, float]]]) -> None:
    keys = [key for key in traces if key.startswith("drift_jumps/")]
    snrs = [float(key.rsplit("/", 1)[1]) for key in keys]
    for k in TRACES:
        ax.plot(snrs, [traces[key][k]["median"] for key in keys], marker="o", ls=":" if k == "still" else "-",
                label=LABELS[k])
    ax.set(title="median per-neuron r vs SNR (drift + jumps)", xlabel="SNR (trace, median over neurons)",
           ylabel="median Pearson r", xscale="log", ylim=(0, 1.05))
    ax.set_xticks(snrs, [f"{v:g}" for v in snrs])
    ax.minorticks_off()
    ax.legend(fontsize=8, loc="center right")


def git_commit() -> dict[str, Any]:
    """HEAD's commit and the tracked files that differ from it (uncommitted changes the run saw)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    modified = git("diff", "--name-only", "HEAD").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(modified), "modified": modified}


@dataclass
class Results:
    """Everything measured, keyed "<motion>/<snr>"."""

    shifts: dict[str, dict[str, Any]]
    traces: dict[str, dict[str, dict[str, float]]]
    rs: dict[str, dict[str, np.ndarray]]
    cost: dict[str, list[float]]
    sessions: dict[str, Session]


def run_all(snrs: list[float], motions: dict[str, MotionConfig], frames: int, reg: RegistrationConfig,
            t_start: float) -> Results:
    """Every (SNR, motion) session; the still fish is each SNR's `still` row and trace reference."""
    res = Results({}, {}, {}, {}, {})
    for snr in snrs:
        still = run_session(FishConfig(snr=snr), frames, reg)
        for name, motion in motions.items():
            key = f"{name}/{snr:g}"
            s = still if name == "still" else run_session(FishConfig(snr=snr, motion=motion), frames, reg)
            res.shifts[key], res.sessions[key] = shift_stats(s, reg.refresh_min_confidence), s
            for k, v in s.cost.items():
                res.cost.setdefault(k, []).extend(v)
            if name != "still":
                res.rs[key] = trace_rs(s, still)
                res.traces[key] = r_summary(res.rs[key])
            print(f"{key}: done at {time.perf_counter() - t_start:.0f} s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--snrs", default="2,4,8")
    ap.add_argument("--figure-snr", type=float, default=4.0)
    ap.add_argument("--name", default="registration-accuracy")
    args = ap.parse_args()
    t_start = time.perf_counter()
    reg, motions = RegistrationConfig(), motion_settings()
    snrs = [float(x) for x in args.snrs.split(",")]
    res = run_all(snrs, motions, args.frames, reg, t_start)
    cost = {k: quantiles(np.array(v)) for k, v in res.cost.items()}
    print_table("per-frame cost, all sessions", cost)
    print_shift_table(res.shifts, reg.refresh_min_confidence)
    print_trace_table(res.traces)
    gain = subvoxel_gain(args.figure_snr)
    print_gain_table(gain)
    fig_key, jumps = f"drift_jumps/{args.figure_snr:g}", jump_frames(motions["drift_jumps"], args.frames)
    if fig_key in res.sessions:
        figure(res.sessions[fig_key], jumps, res.rs, args.figure_snr, res.traces)
    payload = {"git": git_commit(), "frames": args.frames, "snrs": snrs, "fish": to_dict(FishConfig()),
               "registration": to_dict(reg), "motions": {k: to_dict(v) for k, v in motions.items()},
               "origin": "mean true shift over the warm-up frames", "trace_truth": "frame.calcium",
               "jump_frames_drift_jumps": jumps, "shift_error": res.shifts, "trace_r": res.traces, "cost": cost,
               "subvoxel_gain": gain,
               "figure": str(FIGURE.relative_to(ROOT)) if fig_key in res.sessions else None,
               "figure_session": _series(res.sessions.get(fig_key)), "run_s": time.perf_counter() - t_start}
    path = write_result(args.name, payload)
    print(f"\nwrote {path} ({payload['run_s']:.0f} s)" + (f", {FIGURE}" if fig_key in res.sessions else ""))


def _series(s: Session | None) -> dict[str, Any] | None:
    """The figure session's true and estimated shifts and confidences, rounded (nan -> None)."""
    if s is None:
        return None

    def rounded(a: np.ndarray) -> list[Any]:
        return [None if not np.isfinite(v) else round(float(v), 4) for v in a.ravel()]

    return {"true": rounded(s.true), "estimated": rounded(s.est), "confidence": rounded(s.conf),
            "layout": "frame-major (T, 3) flattened for true and estimated"}


if __name__ == "__main__":
    main()
