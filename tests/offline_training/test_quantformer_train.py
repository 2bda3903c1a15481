from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from loopcast.config import ConfigError
from loopcast.models.quantformer import QuantFormer, QuantFormerConfig
from loopcast.offline_training.quantformer import eval as qe
from loopcast.offline_training.quantformer.train import (
    QuantFormerResult,
    QuantFormerTrainConfig,
    activation_threshold,
    finetune,
    load_data,
    normalise,
    pretrain,
    train_quantformer,
)
from loopcast.realtime.engines.loader import load_engine
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.synth import SynthConfig, synthesize
from loopcast.settings import DEFAULT_CONFIG, load_settings

CFG = QuantFormerTrainConfig(context=8, horizon=4, model_options={"patch": 4, "d_model": 32, "n_heads": 2,
                                                                  "n_layers": 2, "codebook_size": 32, "code_dim": 8},
                             pretrain_epochs=3, finetune_epochs=2, batch_size=16, neurons_per_batch=32,
                             max_context=8, threads=1, restart_every=5)


@pytest.fixture(scope="session")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    """A tiny synthetic fish: 200 neurons, 4 ensembles, 400 frames, no raw volumes."""
    cfg = SynthConfig(fish=FishConfig(shape=(48, 32, 8), n_neurons=200, n_ensembles=4), n_frames=400,
                      write_raw=False)
    return synthesize(cfg, tmp_path_factory.mktemp("qf") / "rec", progress=False)


@pytest.fixture(scope="module")
def trained(recording: Recording, tmp_path_factory: pytest.TempPathFactory) -> QuantFormerResult:
    root = tmp_path_factory.mktemp("qf-train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny conditions: some ranges hold no window
        return train_quantformer(recording, CFG, root / "engines", root / "run", progress=False)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="patch 3 must divide"):
        QuantFormerTrainConfig(model_options={"patch": 3})
    with pytest.raises(ValueError, match="model must be 'quantformer'"):
        QuantFormerTrainConfig(model="nlinear")
    with pytest.raises(ValueError, match="activation_quantile"):
        QuantFormerTrainConfig(activation_quantile=1.0)
    with pytest.raises(ValueError, match="normalisation"):
        QuantFormerTrainConfig(normalisation="batch")
    cfg = QuantFormerTrainConfig().model_config(n_neurons=5, n_covariates=26)
    assert cfg["codebook_size"] == 512 and cfg["n_neurons"] == 5 and cfg["context"] == 16
    model_defaults = dataclasses.asdict(QuantFormerConfig(n_neurons=1))   # no model_options: the model's defaults
    assert QuantFormerTrainConfig().model_config(1, 0) == model_defaults


def test_unknown_model_option_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"model_options \['d_modle'\] are not options of model 'quantformer'; "
                                         r"its options: \['code_dim', 'codebook_size', .*'d_model'"):
        QuantFormerTrainConfig(model_options={"d_modle": 32})


def test_derived_model_option_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model_options \['context'\] are set by \[train_quantformer\] and the data"):
        QuantFormerTrainConfig(model_options={"context": 8})


def test_model_options_from_toml_and_dotted_override(tmp_path: Path) -> None:
    toml = tmp_path / "qf.toml"
    toml.write_text("[train_quantformer.model_options]\nn_heads = 2\ncode_dim = 8\n")
    cfg = load_settings([DEFAULT_CONFIG, toml], ["train_quantformer.model_options.d_model=32"]).train_quantformer
    assert cfg.model_options == {"patch": 4, "codebook_size": 512, "d_model": 32, "n_layers": 3, "n_heads": 2,
                                 "code_dim": 8}   # configs/loopcast.toml's, then the file's and the override
    built = cfg.build_model_config(5, 26)
    assert (built.d_model, built.n_heads, built.code_dim, built.decode) == (32, 2, 8, "expected")
    with pytest.raises(ConfigError, match="model_options \\['d_modle'\\]"):   # when the section is read
        _ = load_settings(toml, ["train_quantformer.model_options.d_modle=32"]).train_quantformer


def test_auto_threshold_sets_the_train_base_rate(recording: Recording) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_data(recording, CFG)
    thr = activation_threshold(data, CFG)
    future = data.dff[data.starts["train"][:, None] + np.arange(CFG.context, CFG.context + CFG.horizon)]
    assert qe.activation_labels(future, thr).mean() == pytest.approx(0.15, abs=0.01)
    assert activation_threshold(data, dataclasses.replace(CFG, activation_threshold=0.3)) == 0.3
    assert len(data.starts["holdout"]) and set(data.starts) == {"train", "val", "test", "holdout"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on a GPU machine: docs/gpu.md)")
def test_pretraining_runs_on_cuda(recording: Recording) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_data(recording, CFG)
    cfg = dataclasses.replace(CFG, pretrain_epochs=1, steps_per_epoch=2, device="cuda")
    model = QuantFormer(cfg.build_model_config(data.n_neurons, 26)).to("cuda")
    history = pretrain(model, data, cfg, progress=False)
    assert np.isfinite(history[-1]["val_loss"]) and next(model.parameters()).is_cuda


def test_pretraining_is_seeded(recording: Recording) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_data(recording, CFG)

    def run(seed: int) -> dict[str, torch.Tensor]:
        cfg = dataclasses.replace(CFG, seed=seed, pretrain_epochs=1, steps_per_epoch=2)
        torch.manual_seed(seed)
        model = QuantFormer(cfg.build_model_config(data.n_neurons, 26))
        pretrain(model, data, cfg, progress=False)
        return model.state_dict()
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["patch_embed.weight"], c["patch_embed.weight"])


def test_both_phases_resume_to_the_uninterrupted_result(recording: Recording, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_data(recording, CFG)
    cfg = dataclasses.replace(CFG, pretrain_epochs=3, finetune_epochs=2, steps_per_epoch=2, restart_every=1)
    threshold = activation_threshold(data, cfg)
    pre, fine = tmp_path / "pre.pt", tmp_path / "fine.pt"

    def model() -> QuantFormer:
        torch.manual_seed(0)
        m = QuantFormer(cfg.build_model_config(data.n_neurons, 26))
        normalise(m, data, cfg)
        return m

    full = model()
    history = (pretrain(full, data, cfg, False), finetune(full, data, threshold, cfg, False))
    assert len(pretrain(model(), data, cfg, False, pre, stop_after=1)) == 1              # killed in pretraining
    resumed = model()
    got = [pretrain(resumed, data, cfg, False, pre)]
    assert len(finetune(resumed, data, threshold, cfg, False, fine, stop_after=1)) == 1  # then in fine-tuning
    again = model()
    got += [pretrain(again, data, cfg, False, pre), finetune(again, data, threshold, cfg, False, fine)]
    assert got[0] == got[1] == history[0] and got[2] == history[1]
    for k, v in full.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_metrics_and_files(trained: QuantFormerResult) -> None:
    m = trained.metrics
    assert m["activation_criterion"] == "mean_dff_above" and m["activation_threshold"] > 0
    assert m["train_base_rate"] == pytest.approx(0.15, abs=0.01)
    assert m["codebook"]["size"] == 32 and 0 < m["codebook"]["val_usage"] <= 1
    for split in ("test", "holdout"):
        act = m[split]["activation"]
        assert 0.0 <= act["auroc"] <= 1.0 and 0.0 <= act["f1"] <= 1.0 and 0.0 < act["base_rate"] < 0.5
        fc = m[split]["forecast"]
        assert set(fc) == {"model_argmax", "model_expected", "mean_baseline", "last_baseline"}
        assert all(len(row["mae_per_step"]) == CFG.horizon for row in fc.values())
    assert m["test"]["activation"]["auroc"] > 0.55  # better than chance after a few epochs
    assert len(m["history"]["pretrain"]) == CFG.pretrain_epochs and len(m["history"]["finetune"]) == 2
    assert trained.checkpoint.is_file() and all(f.is_file() for f in trained.figures)
    saved = json.loads((trained.checkpoint.parent / "metrics.json").read_text())
    assert saved["test"]["activation"] == m["test"]["activation"]


def test_activation_engine_loads_and_runs(trained: QuantFormerResult, recording: Recording) -> None:
    assert trained.engine is not None and trained.engine.parent.name == "quantformer-act-c8-h4"
    engine = load_engine(trained.engine)
    man = engine.manifest
    assert (man.task, man.signal, man.model, man.horizon) == ("activation", "dff", "quantformer", 4)
    assert man.activation == {"criterion": "mean_dff_above", "threshold": trained.metrics["activation_threshold"],
                              "window": 4}
    assert man.metrics is not None
    assert man.metrics["test"]["activation"]["auroc"] == trained.metrics["test"]["activation"]["auroc"]
    rng = np.random.default_rng(0)
    out = engine.run(rng.normal(0, 0.2, (8, 200)).astype(np.float32), rng.random((12, 26), dtype=np.float32))
    assert out.shape == (1, 200) and out.min() >= 0.0 and out.max() <= 1.0


def test_forecast_engine_and_checkpoint(trained: QuantFormerResult) -> None:
    assert trained.forecast_engine is not None
    engine = load_engine(trained.forecast_engine)
    assert engine.manifest.task == "forecast" and engine.manifest.lead_times == (1, 2, 3, 4)
    saved = torch.load(trained.checkpoint, map_location="cpu", weights_only=False)
    assert saved["activation_threshold"] == trained.metrics["activation_threshold"]
    assert saved["model_config"]["n_covariates"] == 26


def test_auroc_and_f1() -> None:
    labels = np.array([0, 0, 1, 1], bool)
    assert qe.auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert qe.auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert qe.auroc(np.full(4, 0.5), labels) == 0.5
    assert np.isnan(qe.auroc(np.ones(3), np.ones(3, bool)))
    assert qe.f1_at(np.array([0.1, 0.6, 0.8, 0.9]), labels, 0.5) == pytest.approx(0.8)
    assert qe.best_f1_threshold(np.array([0.1, 0.2, 0.8, 0.9]), labels) < 0.8
    fpr, tpr = qe.roc_curve(np.array([0.1, 0.2, 0.8, 0.9]), labels)
    assert fpr[0] == tpr[0] == 1.0 and fpr[-1] == tpr[-1] == 0.0
