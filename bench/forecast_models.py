"""Every trace forecaster trained and scored the ZAPBench way on the synthetic fish, at C = 4 and C = 256.

For each context and learned model (nlinear, tsmixer, timemix, tide) the script trains with the
ZAPBench recipe (AdamW 1e-3, weight decay 1e-4, batch 8, early stopping on val MAE; on this 2-core
CPU each epoch is capped at --steps-per-epoch batches), exports an engine, and scores every engine
plus the mean / last / stimulus baselines with `offline_training.eval.harness` on the TEST split (the
exported ONNX artifacts through ONNX Runtime, not the torch modules). H = 32.

Writes bench/results/forecast-models-<date>-<host>.json (the MAE table: models x contexts x
steps 1, 8, 32 and the mean over steps, per condition, average and holdout), the evaluation files
(table.md, table.csv, figure) under bench/results/forecast-models/, and docs/figures/forecast_mae.png.

    .venv/bin/python bench/forecast_models.py [--data data/synth-long] [--contexts 4 256]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.offline_training.data.fingerprint import data_fingerprint
from loopcast.offline_training.eval.harness import EvalConfig, evaluate_engines
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.export.versions import engine_name
from loopcast.offline_training.trace.train import (
    TrainConfig,
    first_window,
    first_window_with_covariates,
    train,
)
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.synth import SynthConfig, synthesize

from common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]

FIGURE = ROOT / "docs" / "figures" / "forecast_mae.png"
LEARNED = ("nlinear", "tsmixer", "timemix", "tide")
HORIZON = 32


def model_options(model: str, context: int) -> dict[str, Any]:
    """ZAPBench's settings: TSMixer C=4 2 blocks mlp 256; C=256 2 blocks mlp 128 + RevIN."""
    long = context >= 64
    if model == "tsmixer":
        return {"n_blocks": 2, "mlp_dim": 128 if long else 256, "revin": long}
    if model == "tide":  # temporal decoder width 16 (paper: 64): its (B, N, H, width) activations dominate on a CPU
        return {"revin": long, "temporal_hidden": 16}
    if model == "timemix":
        return {"revin": long}
    return {}


def ensure_data(path: Path, frames: int, neurons: int) -> Recording:
    """The benchmark fish: ZAPBench's 7879 frames so every condition holds C=256 windows."""
    if not (path / "loopcast.json").is_file():
        cfg = SynthConfig(fish=FishConfig(n_neurons=neurons), n_frames=frames, write_raw=False)
        synthesize(cfg, path, progress=True)
    return Recording.open(path)


def train_one(rec: Recording, traces: np.ndarray, cov: np.ndarray, model: str, context: int,
              args: argparse.Namespace, registry: Path) -> dict[str, Any]:
    cfg = TrainConfig(model=model, context=context, horizon=HORIZON, max_epochs=args.max_epochs,
                      patience=args.patience, steps_per_epoch=args.steps_per_epoch, threads=args.threads,
                      model_options=model_options(model, context))
    done = registry / engine_name(model, context, HORIZON) / "run.json"
    if done.is_file():  # trained by an earlier, interrupted run of this script with the same registry
        return json.loads(done.read_text())
    t0 = time.monotonic()
    result = train(traces, rec.condition_offsets, cfg, progress=True,
                   covariates=cov if cfg.uses_covariates else None)
    seconds = time.monotonic() - t0
    window = (first_window_with_covariates(traces, rec.condition_offsets, cfg, cov) if cfg.uses_covariates
              else first_window(traces, rec.condition_offsets, cfg))
    path = export_engine(result.model, cfg, registry, traces.shape[1], result.metrics,
                         data_fingerprint(traces, rec.condition_offsets), str(rec.root), parity_input=window)
    params = sum(p.numel() for p in result.model.parameters())
    print(f"{model} C={context}: {seconds:.0f} s, best epoch {result.best_epoch}, "
          f"val MAE {result.metrics['val']['model']['mae']:.4f}, {params} parameters -> {path}")
    run = {"model": model, "context": context, "engine": str(path), "train_s": seconds,
           "best_epoch": result.best_epoch, "epochs": len(result.history), "parameters": params,
           "val_mae": result.metrics["val"]["model"]["mae"], "options": cfg.model_options,
           "history": list(result.history), "max_epochs": cfg.max_epochs, "steps_per_epoch": cfg.steps_per_epoch}
    done.write_text(json.dumps(run, indent=2))
    return run


def summary(result: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of the table and the 'beats the mean baseline' check per learned engine."""
    rows = result.table()
    avg = {r["model"]: r for r in rows if r["condition"] == "average"}
    checks = {}
    for run in runs:
        label = next(k for k in avg if k.startswith(f"{run['model']}-c{run['context']}-"))
        mean = avg[f"mean-c{run['context']}"]
        checks[label] = {"test_mae": avg[label]["mean"], "mean_baseline_mae": mean["mean"],
                         "beats_mean": bool(avg[label]["mean"] < mean["mean"])}
    return {"rows": rows, "beats_mean_baseline": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "synth-long"))
    ap.add_argument("--frames", type=int, default=7879)
    ap.add_argument("--neurons", type=int, default=3000)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4, 256])
    ap.add_argument("--models", nargs="+", default=list(LEARNED), choices=LEARNED)
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--registry", default=str(ROOT / "data" / "bench-engines"))
    ap.add_argument("--fresh", action="store_true", help="retrain even where the registry has a run")
    args = ap.parse_args()
    rec = ensure_data(Path(args.data), args.frames, args.neurons)
    traces, cov = rec.traces(), rec.stimuli()
    registry = Path(args.registry)
    if args.fresh:
        shutil.rmtree(registry, ignore_errors=True)
    runs = [train_one(rec, traces, cov, m, c, args, registry) for c in args.contexts for m in args.models]
    config = EvalConfig(max_context=max(256, *args.contexts))
    result = evaluate_engines([r["engine"] for r in runs], traces, rec.condition_offsets, rec.condition_names,
                              covariates=cov, config=config, threads=args.threads)
    out = RESULTS / "forecast-models"
    files = result.write(out)
    shutil.copyfile(files["figure"], FIGURE)
    print(result.markdown())
    body = summary(result, runs)
    for label, c in body["beats_mean_baseline"].items():
        print(f"{label:<28} test MAE {c['test_mae']:.4f} vs mean {c['mean_baseline_mae']:.4f}: "
              f"{'beats' if c['beats_mean'] else 'DOES NOT beat'} the mean baseline")
    path = write_result("forecast-models", {
        "description": __doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "),
        "data": {"source": str(rec.root), "frames": rec.n_frames, "neurons": rec.n_neurons,
                 "fingerprint": data_fingerprint(traces, rec.condition_offsets)},
        "horizon": HORIZON, "settings": {k: v for k, v in vars(args).items() if k not in ("registry", "fresh")},
        "training": runs, **body, "evaluation": result.to_json()})
    print(f"wrote {path}, {out}, {FIGURE}")


if __name__ == "__main__":
    main()
