"""QuantFormer on a synthetic fish: activation prediction and forecasting beside NLinear, TSMixer and baselines.

Trains QuantFormer (offline_training.quantformer.train: masked auto-encoding pretraining with a VQ codebook,
then joint fine-tuning of the activation and code-classification heads) on the pipeline's causal dF/F of a
synthetic fish (replay.synth; cached under data/), C = 16, H = 8, patch 4, codebook 512 (the paper's size), on
the CPU. Held-out windows start at condition 3's first frame (--max-context 16; ZAPBench starts them 256 - C
frames in so that contexts up to 256 score the same targets, but every model here has C = 16).
On the same test windows (training conditions pooled) and holdout windows it scores:
  - activation (mean dF/F over the next H frames > the auto threshold): QuantFormer's AUROC / F1, and the
    AUROC of the mean of each forecaster's H-step forecast used as a score (NLinear, TSMixer, mean, last);
  - forecasting MAE per step ahead: QuantFormer (argmax code and probability-weighted decodes), NLinear and
    TSMixer (offline_training.trace.train, the ZAPBench recipe with capped epochs), mean-of-context, last value.

Writes bench/results/quantformer-science-<date>-<host>.json and docs/figures/quantformer_science.png.
`--quick` runs a tiny version (small fish, tiny model, one epoch) into a temporary directory as a smoke test.

    .venv/bin/python bench/quantformer_science.py [--quick] [--neurons 800] [--frames 3000]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopcast.models.baselines import LastValue, LastValueConfig, MeanBaseline, MeanBaselineConfig
from loopcast.models.quantformer import QuantFormer, QuantFormerConfig
from loopcast.offline_training.data.splits import gather_windows
from loopcast.offline_training.eval.plot import pyplot, save_figure
from loopcast.offline_training.quantformer import eval as qe
from loopcast.offline_training.quantformer.train import (
    QuantFormerTrainConfig,
    activation_threshold,
    load_data,
    train_quantformer,
)
from loopcast.offline_training.trace.train import TrainConfig, train
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.synth import SynthConfig, synthesize

from common import write_result

ROOT = Path(__file__).resolve().parents[1]

FIGURE = ROOT / "docs" / "figures" / "quantformer_science.png"
REGRESSORS = {"nlinear": {}, "tsmixer": {"n_blocks": 2, "mlp_dim": 256}}


def ensure_data(path: Path, frames: int, neurons: int, progress: bool) -> Recording:
    """The benchmark fish (raw traces kept, so the causal dF/F is the pipeline's)."""
    if not (path / "loopcast.json").is_file():
        cfg = SynthConfig(fish=FishConfig(n_neurons=neurons), n_frames=frames, write_raw=False)
        synthesize(cfg, path, progress=progress)
    return Recording.open(path)


def quantformer_config(args: argparse.Namespace) -> QuantFormerTrainConfig:
    if args.quick:
        return QuantFormerTrainConfig(model_options={"d_model": 32, "n_heads": 2, "n_layers": 1, "codebook_size": 64,
                                                     "code_dim": 8},
                                      pretrain_epochs=1, finetune_epochs=1, steps_per_epoch=5, max_context=16,
                                      threads=args.threads, max_eval_windows=64)
    return QuantFormerTrainConfig(model_options={"codebook_size": args.codebook}, pretrain_epochs=args.pretrain_epochs,
                                  finetune_epochs=args.finetune_epochs, steps_per_epoch=args.steps_per_epoch,
                                  threads=args.threads, max_context=args.max_context,
                                  future_covariates=args.future_covariates)


Curve = tuple[np.ndarray, np.ndarray]


@torch.no_grad()
def score_forecaster(model: torch.nn.Module, dff: np.ndarray, starts: np.ndarray, cfg: QuantFormerTrainConfig,
                     threshold: float) -> tuple[dict[str, Any], Curve]:
    """MAE per step ahead, and the AUROC (and ROC curve) of the mean H-step forecast as an activation score."""
    model.eval()
    err, scores, labels = np.zeros(cfg.horizon), [], []
    for i in range(0, len(starts), 32):
        x, y = gather_windows(dff, starts[i:i + 32], cfg.context, cfg.horizon)
        pred = model(torch.from_numpy(x)).numpy()                          # (B, H, N)
        err += np.abs(pred - y).sum(axis=(0, 2))
        scores.append(pred.mean(axis=1))
        labels.append(qe.activation_labels(y, threshold))
    per_step = err / (len(starts) * dff.shape[1])
    score, label = np.concatenate(scores), np.concatenate(labels)
    row = {"mae": float(per_step.mean()), "mae_per_step": [float(v) for v in per_step],
           "activation_auroc_from_forecast": qe.auroc(score, label)}
    return row, qe.roc_curve(score, label)


def train_regressor(name: str, dff: np.ndarray, rec: Recording, cfg: QuantFormerTrainConfig,
                    args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """NLinear / TSMixer with offline_training.trace.train on the same dF/F, C, H and splits."""
    tcfg = TrainConfig(model=name, context=cfg.context, horizon=cfg.horizon, max_epochs=args.max_epochs,
                       patience=3, steps_per_epoch=args.regressor_steps, threads=args.threads,
                       max_context=cfg.max_context, model_options=REGRESSORS[name])
    t0 = time.monotonic()
    result = train(dff, rec.condition_offsets, tcfg, progress=not args.quick)
    return result.model, {"train_s": time.monotonic() - t0, "best_epoch": result.best_epoch,
                          "epochs": len(result.history), "options": REGRESSORS[name]}


def comparison(qf: dict[str, Any], models: dict[str, torch.nn.Module], dff: np.ndarray,
               starts: dict[str, np.ndarray], cfg: QuantFormerTrainConfig,
               threshold: float) -> tuple[dict[str, dict[str, Any]], dict[str, Curve]]:
    """Per split: every forecaster's MAE (and activation AUROC) on QuantFormer's windows; test ROC curves."""
    models = {**models, "mean": MeanBaseline(MeanBaselineConfig(cfg.context, cfg.horizon)),
              "last": LastValue(LastValueConfig(cfg.context, cfg.horizon))}
    table: dict[str, dict[str, Any]] = {}
    curves: dict[str, Curve] = {}
    for split in ("test", "holdout"):
        if split not in qf:
            continue
        act = qf[split]["activation"]
        rows = {f"quantformer_{d}": qf[split]["forecast"][f"model_{d}"] for d in ("expected", "argmax")}
        rows["quantformer_expected"] = {**rows["quantformer_expected"], "activation_auroc": act["auroc"],
                                        "activation_f1": act["f1"]}
        for name, model in models.items():
            rows[name], curve = score_forecaster(model, dff, starts[split], cfg, threshold)
            if split == "test":
                curves[name] = curve
        table[split] = rows
    return table, curves


def plot(table: dict[str, dict[str, Any]], curves: dict[str, Curve], path: Path) -> Path:
    """ROC curves (test) and MAE vs step ahead (test, holdout) of every model."""
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    colours = {name: f"C{i}" for i, name in enumerate(table["test"])}
    for name, (fpr, tpr) in curves.items():
        row = table["test"][name]
        auc = row.get("activation_auroc", row.get("activation_auroc_from_forecast"))
        label = "quantformer" if name.startswith("quantformer") else f"{name} (mean of forecast)"
        axes[0].plot(fpr, tpr, color=colours[name], label=f"{label}: AUROC {auc:.3f}")
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="activation, test split")
    axes[0].legend(fontsize=8)
    for ax, split in zip(axes[1:], ("test", "holdout")):
        for name, row in table.get(split, {}).items():
            steps = np.arange(1, len(row["mae_per_step"]) + 1)
            ax.plot(steps, row["mae_per_step"], marker="o", ms=3, color=colours[name],
                    label=f"{name} ({row['mae']:.4f})")
        ax.set(xlabel="step ahead", ylabel="MAE (dF/F)", title=f"forecasting MAE, {split}")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    rec = ensure_data(Path(args.data), args.frames, args.neurons, progress=not args.quick)
    cfg = quantformer_config(args)
    t0 = time.monotonic()
    result = train_quantformer(rec, cfg, out / "engines", out / "run", progress=not args.quick)
    qf_seconds = time.monotonic() - t0
    data = load_data(rec, cfg)
    threshold = activation_threshold(data, cfg)
    models, runs = {}, {}
    for name in REGRESSORS:
        models[name], runs[name] = train_regressor(name, data.dff, rec, cfg, args)
    table, curves = comparison(result.metrics, models, data.dff, data.starts, cfg, threshold)
    scores = qe.score_windows(_load_model(result.checkpoint), data.dff, data.cov, data.starts["test"], threshold,
                              cfg.eval_batch_size)
    curves = {"quantformer_expected": qe.roc_curve(*scores.probs()), **curves}
    figure = plot(table, curves, out / "quantformer_science.png")
    pre = result.metrics["history"]["pretrain"][-1]
    return {"data": {"source": str(rec.root), "frames": rec.n_frames, "neurons": rec.n_neurons,
                     "signal": "causal dF/F (offline_training.data.loop_signals.loop_dff)"},
            "config": dataclasses.asdict(cfg), "activation_threshold": threshold,
            "windows": {k: int(len(v)) for k, v in data.starts.items()},
            "quantformer": {k: v for k, v in result.metrics.items() if k != "history"},
            "codebook": {"usage": pre["val_usage"], "perplexity": pre["val_perplexity"], "size": cfg.codebook_size},
            "train_s": {"quantformer": qf_seconds, **{k: v["train_s"] for k, v in runs.items()}},
            "regressors": runs, "comparison": table, "engine": str(result.engine), "figure": str(figure)}


def _load_model(checkpoint: Path) -> QuantFormer:
    """The fine-tuned QuantFormer of a train_quantformer checkpoint."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = QuantFormer(QuantFormerConfig(**saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run into a temporary directory")
    ap.add_argument("--data", default=None, help="recording (default data/synth-quantformer[-quick])")
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--neurons", type=int, default=800)
    ap.add_argument("--codebook", type=int, default=512)
    ap.add_argument("--max-context", type=int, default=16,
                    help="held-out scoring offset (ZAPBench: 256; every model here has C = 16, so 16 keeps the "
                         "short held-out condition of a 3000-frame fish in play)")
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=8)
    ap.add_argument("--steps-per-epoch", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=20, help="NLinear / TSMixer epochs (early stopping)")
    ap.add_argument("--regressor-steps", type=int, default=200, help="NLinear / TSMixer steps per epoch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--future-covariates", default="recorded", choices=("recorded", "held"),
                    help="QuantFormer's future stimulus; 'held' (as the loop serves it) writes "
                         "quantformer-science-held-<date>-<host>.json and keeps its figure in data/")
    args = ap.parse_args()
    if args.quick:
        args.frames, args.neurons, args.max_epochs, args.regressor_steps = 600, 200, 1, 5
    args.data = args.data or str(ROOT / "data" / ("synth-quantformer-quick" if args.quick else "synth-quantformer"))
    out = ROOT / "data" / "quantformer-science"
    if args.quick:
        out = Path(tempfile.mkdtemp(prefix="quantformer-science-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # short conditions: some ranges hold no window
        body = run(args, out)
    for split, rows in body["comparison"].items():
        print(f"\n{split}: {'model':<20}{'MAE':>9}{'AUROC':>9}")
        for name, row in rows.items():
            auc = row.get("activation_auroc", row.get("activation_auroc_from_forecast"))
            print(f"      {name:<20}{row['mae']:>9.4f}" + ("" if auc is None else f"{auc:>9.3f}"))
    if args.quick:
        print(f"\nquick run: outputs in {out} (nothing written to bench/results or docs/figures)")
        return
    if args.future_covariates == "recorded":
        Path(body["figure"]).replace(FIGURE)
        body["figure"] = str(FIGURE.relative_to(ROOT))
    name = "quantformer-science" + ("" if args.future_covariates == "recorded" else "-held")
    path = write_result(name, {"description": __doc__.split("\n\n")[0], **body})
    print(f"wrote {path} and {body['figure']}")


if __name__ == "__main__":
    main()
