"""The simulator at a glance: raster of dF/F over the 9 ZAPBench conditions, stimulus covariates,
behaviour readout, and a max-projection of one volume. Writes docs/figures/simulator.png.

    .venv/bin/python docs/figures/simulator_figure.py [--recording data/figure-ds4]
(without --recording, synthesizes a 4x-downsampled ZAPBench-scale fish first: configs/zapbench-ds4.toml)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from loopcast.replay.layout import Recording
from loopcast.replay.synth import synthesize
from loopcast.settings import DEFAULT_CONFIG, load_settings

ROOT = Path(__file__).resolve().parents[2]


def recording(path: str | None, frames: int) -> Recording:
    if path and Path(path).exists():
        return Recording.open(path)
    out = path or str(ROOT / "data" / "figure-ds4")
    cfg = load_settings([DEFAULT_CONFIG, ROOT / "configs" / "zapbench-ds4.toml"],
                        [f"synth.n_frames={frames}", "synth.write_raw=true"])
    return synthesize(cfg.synth, out, progress=True, overwrite=True)


def pick_neurons(rec: Recording, n_show: int, n_groups: int = 12) -> tuple[np.ndarray, list[int]]:
    """n_show neurons: n_show / n_groups random members of each of n_groups ensembles (or random ones)."""
    rng = np.random.default_rng(0)
    if not rec.has("ground_truth/ensemble"):
        return np.sort(rng.choice(rec.n_neurons, size=min(n_show, rec.n_neurons), replace=False)), []
    ens = rec.ground_truth("ensemble")
    groups = [np.flatnonzero(ens == e) for e in range(min(n_groups, int(ens.max()) + 1))]
    per = n_show // len(groups)
    pick = [np.sort(rng.choice(g, size=min(per, g.size), replace=False)) for g in groups]
    return np.concatenate(pick), list(np.cumsum([p.size for p in pick])[:-1])


def raster(ax: plt.Axes, rec: Recording, n_show: int) -> None:
    traces = rec.traces()                                         # (T, N)
    pick, bounds = pick_neurons(rec, n_show)
    ax.imshow(traces[:, pick].T, aspect="auto", cmap="magma", vmin=-0.1, vmax=0.8, interpolation="nearest")
    for o in rec.condition_offsets[1:-1]:
        ax.axvline(o - 0.5, color="w", lw=0.6)
    for b in bounds:
        ax.axhline(b - 0.5, color="c", lw=0.4)
    mids = [(a + b) / 2 for a, b in zip(rec.condition_offsets, rec.condition_offsets[1:])]
    for m, name in zip(mids, rec.condition_names):
        ax.text(m, -n_show * 0.02, name, ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(f"{len(pick)} of {rec.n_neurons} neurons\n({len(bounds) + 1} ensembles)" if bounds
                  else f"{len(pick)} of {rec.n_neurons} neurons")
    ax.set_xticks([])


def covariates(ax: plt.Axes, rec: Recording) -> None:
    stim = rec.stimuli()                                          # (T, 26)
    ax.imshow(stim.T, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_ylabel("covariates", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def behaviour(ax: plt.Axes, rec: Recording) -> None:
    if rec.has("ground_truth/behaviour"):
        ax.plot(rec.ground_truth("behaviour"), lw=0.6, color="tab:blue")
    ax.set_xlim(0, rec.n_frames - 1)
    ax.set_ylabel("swim\nvigor", fontsize=8)
    ax.set_xlabel(f"frame ({rec.frame_period_s:.4f} s per volume)")


def projection(ax: plt.Axes, rec: Recording, t: int) -> None:
    vol = rec.read_volume(t).astype(np.float32)                   # (x, y, z)
    mip = vol.max(axis=2).T                                       # (y, x)
    lo, hi = np.percentile(mip, [1, 99.7])
    ax.imshow(mip, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_title(f"max projection over z, frame {t} ({'x'.join(map(str, rec.volume_shape))} raw counts)",
                 fontsize=8)
    ax.set_axis_off()


def main() -> int:
    matplotlib.use("Agg")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recording", default=None)
    ap.add_argument("--frames", type=int, default=1200)
    ap.add_argument("--neurons", type=int, default=600, help="rows in the raster")
    ap.add_argument("--out", default=str(Path(__file__).with_name("simulator.png")))
    args = ap.parse_args()
    rec = recording(args.recording, args.frames)
    fig = plt.figure(figsize=(11, 10.5), constrained_layout=True)
    gs = fig.add_gridspec(4, 2, height_ratios=[5, 1.1, 1, 6], width_ratios=[1, 1])
    raster(fig.add_subplot(gs[0, :]), rec, args.neurons)
    covariates(fig.add_subplot(gs[1, :]), rec)
    behaviour(fig.add_subplot(gs[2, :]), rec)
    projection(fig.add_subplot(gs[3, :]), rec, t=rec.n_frames // 2)
    fig.suptitle(f"loopcast synthetic fish: {rec.n_neurons} neurons, {rec.n_frames} frames, 9 ZAPBench conditions")
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
