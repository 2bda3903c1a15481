"""The Sparse Brain Model's science check on a synthetic fish, at small scale on a CPU (SBM paper Sec. 3).

Data: a synthetic fish (replay.synth, default dynamics; 1000 neurons, 3000 frames, no raw volumes: the
raw segment means are stored) cached under data/sbm-science, turned into the loop's causal spike
probabilities (offline_training.data.loop_signals: causal dF/F -> streaming OASIS), with the stimulus
covariates and the ZAPBench-style condition splits (condition 3 held out).
Model: a small SBM (C = 12, the paper's 4 s; routed spatial attention) trained with teacher-forced BCE
(offline_training.sbm.train; Muon for the 2-D body weights + AdamW, as in the paper), exported as
engine sbm-c12-h4. Then the behaviour head (PNM) on the ground-truth probabilities -> the simulator's
swim vigor, scored on ground-truth inputs and on the SBM's next-step predictions of the same frames.
Reports: next-step MAE on test and holdout beside the last-value and mean-of-context baselines,
calibration (per-neuron mean r and slope, ECE), rollout error growth over 16 steps (exponent of
MAE(r) ~ r^b; b < 1 is sublinear) and the PNM's Pearson r.

Writes bench/results/sbm-science-<date>-<host>.json and docs/figures/sbm_calibration.png + sbm_rollout.png.
`--quick` runs a tiny version (small fish, tiny model, a few steps) in a temporary directory as a smoke
test and writes no result file or figure.

    .venv/bin/python bench/sbm_science.py [--quick] [--neurons 1000] [--frames 3000] [--steps 200]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopcast.offline_training.sbm.config import SBMTrainConfig
from loopcast.offline_training.sbm.eval import SBMEvalConfig, next_step_frames, torch_predictor
from loopcast.offline_training.sbm.pnm_train import PNMTrainConfig, input_frames, train_pnm
from loopcast.offline_training.sbm.train import SBMResult, load_data, train_sbm
from loopcast.realtime.preprocess.stage import PreprocessConfig
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording, RecordingError
from loopcast.replay.synth import SynthConfig, synthesize

from common import write_result

ROOT = Path(__file__).resolve().parents[1]

FIGURES = ROOT / "docs" / "figures"
FIGURE_FILES = ("sbm_calibration.png", "sbm_rollout.png")


def ensure_recording(path: Path, neurons: int, frames: int, shape: tuple[int, int, int],
                     progress: bool = True) -> Recording:
    """The cached synthetic fish at `path`, synthesized if absent or of another size."""
    try:
        rec = Recording.open(str(path))
        if (rec.n_neurons, rec.n_frames) == (neurons, frames) and rec.has("traces_raw"):
            return rec
    except (RecordingError, FileNotFoundError, OSError):
        pass
    fish = FishConfig(shape=shape, n_neurons=neurons)
    return synthesize(SynthConfig(fish=fish, n_frames=frames, write_raw=False), path, progress=progress,
                      overwrite=True)


def loop_preprocess() -> PreprocessConfig:
    """The pipeline's preprocessing as configs/loopcast.toml sets it (the spike scale of the default fish)."""
    from loopcast.settings import load_settings
    return load_settings().pipeline.preprocess


def sbm_config(args: argparse.Namespace) -> SBMTrainConfig:
    options = {"d_model": args.d_model, "n_heads": 2, "n_layers": args.layers, "cluster_size": args.cluster,
               "membership": args.membership, "routing_margin": args.margin}
    return SBMTrainConfig(context=args.context, horizon=4, seed=args.seed, model_options=options,
                          optimizer=args.optimizer, batch_size=args.batch, max_steps=args.steps, max_epochs=1000,
                          val_per_epoch=4, val_windows=64, patience=8, threads=args.threads, device=args.device,
                          eval=SBMEvalConfig(rollout_steps=args.rollout, rollout_starts=args.rollout_starts),
                          future_covariates=args.future_covariates)


def pnm_part(rec: Recording, sbm: SBMResult, cfg: SBMTrainConfig, args: argparse.Namespace,
             run_dir: Path) -> dict[str, Any]:
    """Train the PNM on ground-truth probabilities; score it on them and on the SBM's predictions."""
    data = load_data(rec, cfg, loop_preprocess())
    pcfg = PNMTrainConfig(steps=args.pnm_steps, batch_size=32, threads=args.threads, seed=args.seed,
                          model_options={"hidden": 32, "temporal_hidden": 64})
    assert sbm.model is not None
    frames = input_frames(data.offsets, pcfg)
    predicted = next_step_frames(torch_predictor(sbm.model), data.probs, data.covariates, frames, cfg.context,
                                 future=cfg.future_covariates)
    behaviour = np.asarray(rec.ground_truth("behaviour"), np.float32)
    result = train_pnm(data.probs, behaviour, data.positions, data.offsets, pcfg, run_dir / "pnm",
                       progress=not args.quick, predicted=predicted)
    return {k: v for k, v in result.metrics.items() if k != "history"}


def summary(metrics: dict[str, Any], pnm: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: next-step MAE vs baselines, calibration, rollout growth, PNM r."""
    out: dict[str, Any] = {}
    for group in ("train_conditions", "holdout"):
        if group not in metrics["next_step"]:
            continue
        cal, roll = metrics["calibration"][group], metrics["rollout"][group]
        out[group] = {"next_step_mae": metrics["next_step"][group],
                      "calibration": {k: cal[k] for k in ("neuron_r", "slope", "intercept", "ece")},
                      "rollout_mae_first_last": [roll["model"][0], roll["model"][-1]],
                      "rollout_mean_mae": {lab: float(np.mean(roll[lab])) for lab in
                                           ("model", "last_value", "context_mean")},
                      "rollout_growth": roll["growth"]}
    out["pnm_r"] = {src: {g: pnm[src][g]["r"] for g in ("test", "holdout") if g in pnm[src]}
                    for src in ("ground_truth", "sbm_predicted") if src in pnm}
    return out


def print_summary(body: dict[str, Any]) -> None:
    for group in ("train_conditions", "holdout"):
        if group in body:
            g = body[group]
            mae = g["next_step_mae"]
            print(f"{group:<17} next-step MAE: SBM {mae['model']:.4f}  last value {mae['last_value']:.4f}  "
                  f"context mean {mae['context_mean']:.4f}")
            print(f"{'':<17} calibration r {g['calibration']['neuron_r']:.3f} slope {g['calibration']['slope']:.2f}"
                  f"  rollout growth b {g['rollout_growth']['exponent']:.2f} "
                  f"(MAE(R)/MAE(1) {g['rollout_growth']['ratio_last_first']:.2f})")
            print(f"{'':<17} rollout mean MAE: " + ", ".join(f"{k} {v:.4f}" for k, v in g["rollout_mean_mae"].items()))
    for src, rs in body["pnm_r"].items():
        print(f"PNM r ({src}): " + ", ".join(f"{g} {r:.3f}" for g, r in rs.items()))


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run in a temporary directory, no files kept")
    ap.add_argument("--data", default=str(ROOT / "data" / "sbm-science"))
    ap.add_argument("--neurons", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--context", type=int, default=6, help="tau (paper: 12; 6 = the CPU loop config)")
    ap.add_argument("--steps", type=int, default=200, help="SBM optimiser steps (cap)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--optimizer", default="muon", choices=("muon", "adamw"),
                    help="muon: torch.optim.Muon for the 2-D body weights + AdamW (the paper's recipe)")
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--cluster", type=int, default=128, help="cluster size w of the routed attention")
    ap.add_argument("--membership", type=int, default=2, help="routing cuts per token (soft edges need 2)")
    ap.add_argument("--margin", type=float, default=3e-3, help="soft routing margin (0 = hard, the paper)")
    ap.add_argument("--rollout", type=int, default=16)
    ap.add_argument("--rollout-starts", type=int, default=8, help="rollout starts per condition")
    ap.add_argument("--pnm-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--future-covariates", default="recorded", choices=("recorded", "held"),
                    help="the target frame's stimulus in training and scoring; 'held' (as the loop serves "
                         "it) writes sbm-science-held-<date>-<host>.json and no figures")
    args = ap.parse_args()
    if args.quick:
        args.neurons, args.frames, args.context, args.steps, args.batch = 200, 400, 6, 10, 4
        args.d_model, args.layers, args.cluster, args.rollout, args.rollout_starts = 16, 1, 64, 4, 4
        args.pnm_steps = 50
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="sbm-science-")) if args.quick else None
    work = tmp or Path(args.data)
    shape = (48, 32, 8) if args.quick else (128, 96, 16)
    try:
        rec = ensure_recording(work / "recording", args.neurons, args.frames, shape, not args.quick)
        cfg = sbm_config(args)
        run_dir = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
        t0 = time.perf_counter()
        sbm = train_sbm(rec, cfg, work / "engines", run_dir, progress=not args.quick, pre=loop_preprocess())
        t_sbm = time.perf_counter() - t0
        pnm = pnm_part(rec, sbm, cfg, args, run_dir)
        body = summary(sbm.metrics, pnm)
        print_summary(body)
        if args.quick:
            print("quick run: no result written")
            return
        if args.future_covariates == "recorded":   # the committed figures are the recorded run's
            FIGURES.mkdir(parents=True, exist_ok=True)
            for fig in sbm.figures:
                shutil.copyfile(fig, FIGURES / fig.name)
        name = "sbm-science" + ("" if args.future_covariates == "recorded" else "-held")
        path = write_result(name, {
            "description": " ".join(__doc__.split("\n\n")[:4]).replace("\n", " "),
            "data": {"source": str(rec.root), **sbm.metrics["data"]}, "settings": dict(vars(args)),
            "engine": str(sbm.engine), "train_seconds": t_sbm, "summary": body,
            "sbm": {k: sbm.metrics[k] for k in ("next_step", "calibration", "rollout", "training")},
            "pnm": pnm})
        print(f"wrote {path}" + (f" and docs/figures/{', '.join(FIGURE_FILES)}"
                                  if args.future_covariates == "recorded" else ""))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
