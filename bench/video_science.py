"""The video forecaster's science check on the synthetic fish: video UNet vs trace models, and the
spatial-vs-temporal context study, at small scale on a CPU.

Data: configs/synth-video.toml (ensembles are spatial clusters coupled only to their neighbours; 3000
frames of 128 x 128 x 8 voxels, 800 neurons with nuclei that survive 4x striding), its raw volumes turned
into ZAPBench-style dF/F volumes 4x mean-downsampled in xy (prepare_video, centered baseline) = 32 x 32 x 8.

Models, all with H = 32 and the ZAPBench splits:
  - trace: nlinear and tsmixer (ZAPBench short-context preset) at every C, the ZAPBench recipe with an
    epoch cap (as bench/forecast_models.py), exported to ONNX engines;
  - video: the UNet at every C x receptive field (0 / 2 / 4 downsampling stages at roughly constant FLOPs,
    the paper's A.1.1 study), a small width for the CPU (--features), trace-based MAE, AdamW + cosine,
    lead time uniform in [1, H], best val checkpoint; exported to ONNX engines.
Everything is scored through the exported engines with offline_training.eval.harness on the same test targets
(holdout aligned with max_context = max(C)); --eval-stride > 1 scores every k-th test window (the
same windows for every model) to keep the CPU time bounded. --seeds repeats runs with other seeds (data
order and initialisation; --replicate-contexts limits which C get them); groups report mean +- two
standard errors over seeds, as the paper does. Trained engines and their scores are cached in --registry
(run.json, eval-*.json), so a rerun only trains and scores what is new.

Writes bench/results/video-science-<date>-<host>.json, the evaluation files under
bench/results/video-science/, and docs/figures/video_science_mae.png + video_spatial_temporal.png.

    .venv/bin/python bench/video_science.py [--contexts 4 16] [--stages 0 2 4] [--steps 4000]
    .venv/bin/python bench/video_science.py --seeds 0 1 2 --replicate-contexts 4   # + 2 seeds at C = 4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopcast.models.video_unet import DEFAULT_DOWNSAMPLE, VideoUNetConfig, count_parameters, receptive_field
from loopcast.offline_training.data.fingerprint import data_fingerprint
from loopcast.offline_training.eval.harness import (
    Condition,
    EvalConfig,
    EvalResult,
    baseline_forecasters,
    evaluate_engines,
    evaluate_models,
)
from loopcast.offline_training.eval.plot import plot_panels
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.export.versions import engine_name
from loopcast.offline_training.trace.train import TrainConfig, first_window, train
from loopcast.offline_training.video.data import VideoData, VideoDataConfig, VideoPrepConfig, prepare_video
from loopcast.offline_training.video.export import export_video_engine
from loopcast.offline_training.video.train import VideoTrainConfig, train_video
from loopcast.replay.layout import Recording
from loopcast.replay.synth import synthesize
from loopcast.settings import load_settings

from common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]

HORIZON = 32
TRACE_MODELS = ("nlinear", "tsmixer")
FIGURES = ROOT / "docs" / "figures"


def ensure_data(path: Path) -> Recording:
    """The science fish (configs/synth-video.toml) and its 4x-downsampled centered dF/F volumes."""
    if not (path / "loopcast.json").is_file():
        cfg = load_settings([ROOT / "configs" / "loopcast.toml", ROOT / "configs" / "synth-video.toml"])
        synthesize(cfg.synth, path, progress=True)
    rec = Recording.open(path)
    if "df_over_f" not in rec.volumes():
        prepare_video(rec, VideoPrepConfig(level=2, baseline="centered"), progress=True)
    return rec


def cached(registry: Path, name: str) -> dict[str, Any] | None:
    done = registry / name / "run.json"
    return json.loads(done.read_text()) if done.is_file() else None


def run_name(base: str, seed: int) -> str:
    """Registry entry of one training run: seed 0 keeps the plain name, replicates get -r<seed>."""
    return base if seed == 0 else f"{base}-r{seed}"


def train_trace(rec: Recording, model: str, context: int, seed: int, args: argparse.Namespace,
                registry: Path) -> dict[str, Any]:
    name = run_name(engine_name(model, context, HORIZON), seed)
    run = cached(registry, name)
    if run:
        return run
    options = {"n_blocks": 2, "mlp_dim": 256} if model == "tsmixer" else {}
    cfg = TrainConfig(model=model, context=context, horizon=HORIZON, max_epochs=args.max_epochs, patience=3,
                      steps_per_epoch=args.steps_per_epoch, threads=args.threads, max_context=max(args.contexts),
                      model_options=options, seed=seed)
    traces = rec.traces()
    t0 = time.monotonic()
    result = train(traces, rec.condition_offsets, cfg, progress=True)
    seconds = time.monotonic() - t0
    path = export_engine(result.model, cfg, registry, traces.shape[1], result.metrics,
                         data_fingerprint(traces, rec.condition_offsets), str(rec.root),
                         parity_input=first_window(traces, rec.condition_offsets, cfg), name=name)
    run = {"model": model, "kind": "trace", "context": context, "seed": seed, "engine": str(path), "train_s": seconds,
           "parameters": sum(p.numel() for p in result.model.parameters()),
           "val_mae": result.metrics["val"]["model"]["mae"], "best_epoch": result.best_epoch}
    (registry / name / "run.json").write_text(json.dumps(run, indent=2))
    return run


def video_config(context: int, stages: int, seed: int, args: argparse.Namespace) -> VideoTrainConfig:
    options = {"features": args.features, "features_sr": args.features, "groups": args.groups,
               "downsample": [list(f) for f in DEFAULT_DOWNSAMPLE[:stages]], "super_resolution": 0}
    return VideoTrainConfig(context=context, horizon=HORIZON, lr=args.lr, lr_min=args.lr * 1e-3,
                            batch_size=args.batch, steps=args.steps, val_every=args.val_every,
                            val_windows=args.val_windows, threads=args.threads, max_context=max(args.contexts),
                            seed=seed, model_options=options, data=VideoDataConfig(level=2, crop_y=0, cache_frames=256))


def train_video_model(rec: Recording, context: int, stages: int, seed: int, args: argparse.Namespace,
                      registry: Path) -> dict[str, Any]:
    name = run_name(f"video_unet-s{stages}-c{context}-h{HORIZON}", seed)
    run = cached(registry, name)
    if run:
        return run
    cfg = video_config(context, stages, seed, args)
    data = VideoData(rec, cfg.data)
    t0 = time.monotonic()
    result = train_video(rec, cfg, registry / "runs" / name, progress=True)
    seconds = time.monotonic() - t0
    metrics = {"val": {"model": {"mae": result.best_val_mae}}, "best_step": result.best_step}
    path = export_video_engine(result.model, cfg, registry, data, metrics, result.data_fingerprint,
                               result.data_source, name=name)
    ucfg = VideoUNetConfig(**cfg.model_config())
    run = {"model": "video_unet", "kind": "video", "context": context, "stages": stages, "seed": seed,
           "receptive_field": list(receptive_field(ucfg)), "engine": str(path), "train_s": seconds,
           "parameters": count_parameters(result.model), "val_mae": result.best_val_mae,
           "best_step": result.best_step, "history": list(result.history), "options": cfg.model_options}
    (registry / name / "run.json").write_text(json.dumps(run, indent=2))
    print(f"{name}: {seconds:.0f} s, best val MAE {result.best_val_mae:.4f} at step {result.best_step}")
    return run


def score_engine(run: dict[str, Any], rec: Recording, config: EvalConfig, threads: int) -> EvalResult:
    """One engine's test MAE (cached beside its run.json: evaluation dominates the CPU time)."""
    key = f"eval-stride{config.stride}-mc{config.max_context}.json"
    cache = Path(run["engine"]).parent / key
    if cache.is_file():
        raw = json.loads(cache.read_text())
        mae = {raw["label"]: {int(k): np.asarray(v, np.float64) for k, v in raw["mae"].items()}}
        return EvalResult(HORIZON, (raw["label"],), tuple(Condition(**c) for c in raw["conditions"]), mae)
    result = evaluate_engines([run["engine"]], rec.traces(), rec.condition_offsets, rec.condition_names,
                              baselines=(), config=config, threads=threads, recording=rec)
    label = result.models[0]
    cache.write_text(json.dumps({"label": label, "conditions": [c.__dict__ for c in result.conditions],
                                 "mae": {k: v.tolist() for k, v in result.mae[label].items()}}))
    return result


def evaluate_all(runs: list[dict[str, Any]], rec: Recording, args: argparse.Namespace) -> EvalResult:
    """Every engine (cached per engine) and the mean / last baselines, merged into one result."""
    config = EvalConfig(max_context=max(args.contexts), stride=args.eval_stride, batch_size=16)
    parts = [score_engine(r, rec, config, args.threads) for r in runs]
    traces = rec.traces()
    base = evaluate_models(traces, rec.condition_offsets, baseline_forecasters(
        ("mean", "last"), args.contexts, HORIZON, traces, rec.condition_offsets, None, config),
        rec.condition_names, config=config)
    if any(p.conditions != base.conditions for p in parts):
        raise ValueError("engines were scored on different windows; delete the eval-*.json caches")
    mae = {m: v for p in [*parts, base] for m, v in p.mae.items()}
    models = tuple(m for p in [*parts, base] for m in p.models)
    return dataclasses.replace(base, models=models, mae=mae, meta={**base.meta, "engines": [r["engine"] for r in runs]})


def label_of(run: dict[str, Any], labels: list[str]) -> str:
    stem = Path(run["engine"]).parent.name
    return next(k for k in labels if k.split("/")[0] == stem)


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and two standard errors over seeds (the paper's error bars); 2SE is None for one seed."""
    v = np.asarray(values, np.float64)
    two_se = float(2 * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "two_se": two_se, "seeds": len(v), "values": v.tolist()}


def group_key(run: dict[str, Any]) -> str:
    if run["kind"] == "video":
        return f"video s{run['stages']} c{run['context']}"
    return f"{run['model']} c{run['context']}"


def summary(result: EvalResult, runs: list[dict[str, Any]], contexts: list[int]) -> dict[str, Any]:
    """Per-run test MAE; per (model, C[, stages]) mean +- 2SE over seeds; the science check; the RF x C grid."""
    rows = result.table()
    avg = {r["model"]: r for r in rows if r["condition"] == "average"}
    hold = {r["model"]: r for r in rows if r["condition"].endswith("(holdout)")}
    per_run = []
    for run in runs:
        label = label_of(run, list(avg))
        per_run.append({**{k: v for k, v in run.items() if k != "history"}, "seed": run.get("seed", 0),
                        "label": label, "test_mae": avg[label]["mean"], "holdout_mae": hold[label]["mean"],
                        "test_mae_steps": {s: avg[label].get(f"step {s}") for s in (1, 8, 32)}})
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in per_run:
        groups.setdefault(group_key(r), []).append(r)
    stats = {k: {"test": spread([r["test_mae"] for r in g]), "holdout": spread([r["holdout_mae"] for r in g]),
                 "kind": g[0]["kind"], "context": g[0]["context"], "stages": g[0].get("stages")}
             for k, g in groups.items()}
    return {"rows": rows, "runs": per_run, "groups": stats, "science_check": science_check(stats, contexts)}


def science_check(stats: dict[str, dict[str, Any]], contexts: list[int]) -> dict[str, Any]:
    """Per C: the best video configuration (mean over seeds) against every trace model at that C."""
    out = {}
    for c in contexts:
        video = {k: g for k, g in stats.items() if g["kind"] == "video" and g["context"] == c}
        trace = {k: g["test"]["mean"] for k, g in stats.items() if g["kind"] == "trace" and g["context"] == c}
        if video and trace:
            best = min(video, key=lambda k: video[k]["test"]["mean"])
            out[f"c{c}"] = {"best_video": best, "video_mae": video[best]["test"], "trace_mae": trace,
                            "video_beats_all_trace": all(video[best]["test"]["mean"] < v for v in trace.values())}
    return out


def plot_grid(body: dict[str, Any], stages: list[int], contexts: list[int], path: Path) -> None:
    """Test MAE (mean +- 2SE over seeds) vs downsampling stages per C, TSMixer at each C as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for i, c in enumerate(contexts):
        color = f"C{i}"
        pts = [body["groups"].get(f"video s{s} c{c}", {}).get("test") for s in stages]
        ax.errorbar([s + 0.06 * i for s in stages], [p["mean"] if p else np.nan for p in pts],
                    yerr=[(p or {}).get("two_se") or 0 for p in pts], marker="o", capsize=3, color=color,
                    label=f"video UNet, C = {c}")
        ts = body["groups"].get(f"tsmixer c{c}", {}).get("test")
        if ts:
            ax.axhline(ts["mean"], ls="--", lw=1, color=color, label=f"TSMixer (traces), C = {c}")
            if ts["two_se"]:
                ax.axhspan(ts["mean"] - ts["two_se"], ts["mean"] + ts["two_se"], color=color, alpha=0.12)
    ax.set_xticks(stages, [f"{s} stages\nRF {21 if s == 0 else 4 * 4 * 2 ** s}" for s in stages])
    ax.set_ylabel("test MAE (training conditions)")
    ax.set_title("spatial vs temporal context on the synthetic fish", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_main(result: EvalResult, args: argparse.Namespace, path: Path) -> None:
    """MAE vs steps ahead per condition at the first C, first seed: every model once, baselines dashed
    (the full table, all seeds and contexts, is in bench/results/video-science/)."""
    c = args.contexts[0]
    keep = [m for m in result.models if m in (f"mean-c{c}", "last")
            or (f"-c{c}-h" in m and "-r" not in m.split("/")[0])]
    panels = [(title, {m: v for m, v in curves.items() if m in keep}) for title, curves in result.panels()]
    plot_panels(panels, path, dashed=result.baselines,
                title=f"video UNet vs trace models, C = {c}: test MAE vs steps ahead (synthetic fish)")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "synth-video"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="seeds of every run (data order and initialisation; the paper reports 3)")
    ap.add_argument("--replicate-contexts", type=int, nargs="*", default=None,
                    help="contexts that get the seeds beyond the first (default: all)")
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--val-windows", type=int, default=256)
    ap.add_argument("--max-epochs", type=int, default=15)
    ap.add_argument("--steps-per-epoch", type=int, default=200)
    ap.add_argument("--eval-stride", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--registry", default=str(ROOT / "data" / "bench-video-engines"))
    ap.add_argument("--fresh", action="store_true", help="retrain even where the registry has a run")
    return ap.parse_args()


def plan(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(model, C, stages, seed) of every run: trace models and video UNets, replicates where asked."""
    rep = args.contexts if args.replicate_contexts is None else args.replicate_contexts
    out = []
    for seed in args.seeds:
        for c in args.contexts:
            if seed != args.seeds[0] and c not in rep:
                continue
            out += [(m, c, 0, seed) for m in TRACE_MODELS] + [("video_unet", c, s, seed) for s in args.stages]
    return out


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    rec = ensure_data(Path(args.data))
    registry = Path(args.registry)
    if args.fresh:
        shutil.rmtree(registry, ignore_errors=True)
    runs = [train_video_model(rec, c, s, seed, args, registry) if m == "video_unet"
            else train_trace(rec, m, c, seed, args, registry) for m, c, s, seed in plan(args)]
    result = evaluate_all(runs, rec, args)
    result.write(RESULTS / "video-science")
    FIGURES.mkdir(parents=True, exist_ok=True)
    plot_main(result, args, FIGURES / "video_science_mae.png")
    body = summary(result, runs, args.contexts)
    plot_grid(body, args.stages, args.contexts, FIGURES / "video_spatial_temporal.png")
    print(result.markdown())
    for key, g in body["groups"].items():
        t, h = g["test"], g["holdout"]
        print(f"{key:<16} test MAE {t['mean']:.4f} +- {t['two_se'] or 0:.4f}  holdout {h['mean']:.4f}  "
              f"({t['seeds']} seeds)")
    for key, check in body["science_check"].items():
        verdict = "beats" if check["video_beats_all_trace"] else "does NOT beat"
        print(f"{key}: best video ({check['best_video']}) MAE {check['video_mae']['mean']:.4f} {verdict} the trace "
              "models " + ", ".join(f"{m} {v:.4f}" for m, v in check["trace_mae"].items()))
    path = write_result("video-science", {
        "description": " ".join(__doc__.split("\n\n")[:3]).replace("\n", " "),
        "data": {"source": str(rec.root), "frames": rec.n_frames, "neurons": rec.n_neurons,
                 "volume": list(rec.volume_shape), "input_volume": list(VideoData(rec).input_shape)},
        "settings": dict(vars(args)), **body})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
