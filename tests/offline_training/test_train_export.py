from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from loopcast import workflows
from loopcast.config import ConfigError, dump_toml, load_config
from loopcast.models import zoo as model_registry
from loopcast.models.linear import NLinear, NLinearConfig
from loopcast.offline_training.data.fingerprint import data_fingerprint
from loopcast.offline_training.data.splits import gather_windows
from loopcast.offline_training.export.engine import ExportError, check_parity, export_engine
from loopcast.offline_training.export.versions import list_engines, versions
from loopcast.offline_training.trace.train import (
    TrainConfig,
    TrainResult,
    first_window,
    first_window_with_covariates,
    mae_per_step,
    train,
)
from loopcast.realtime.engines.base import resolve_engine
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.settings import LoopcastConfig, PathsConfig, load_settings

# The CPU: the seeded and resumed runs below must be bit-equal (GPU kernels need not be).
CFG = TrainConfig(context=4, horizon=8, batch_size=16, max_epochs=12, patience=3, threads=1, lr=5e-3, device="cpu")
MANIFEST_KEYS = {"format", "format_version", "name", "version", "model", "model_config", "context",
                 "horizon", "lead_times", "n_neurons", "inputs", "outputs", "normalisation", "metrics",
                 "parity", "data", "code_version", "created", "files"}


@pytest.fixture(scope="module")
def trained(traces: np.ndarray, offsets: tuple[int, ...]) -> TrainResult:
    return train(traces, offsets, CFG, progress=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, trained: TrainResult, traces: np.ndarray,
             offsets: tuple[int, ...]) -> Path:
    root = tmp_path_factory.mktemp("engines")
    export_engine(trained.model, CFG, root, traces.shape[1], trained.metrics,
                  data_fingerprint(traces, offsets), "synthetic:test",
                  parity_input=first_window(traces, offsets, CFG))
    return root


def test_training_beats_mean_baseline(trained: TrainResult) -> None:
    val = trained.metrics["val"]
    assert len(val["model"]["mae_per_step"]) == CFG.horizon
    assert val["model"]["mae"] < 0.8 * val["mean_baseline"]["mae"], val
    assert val["conditions"] == ["condition0", "condition1", "condition2"]  # condition 3 held out
    assert trained.history and trained.best_epoch >= 1
    assert min(h["val_mae"] for h in trained.history) == pytest.approx(
        [h for h in trained.history if h["epoch"] == trained.best_epoch][0]["val_mae"])


def test_training_is_seeded(traces: np.ndarray, offsets: tuple[int, ...]) -> None:
    cfg = dataclasses.replace(CFG, max_epochs=2, steps_per_epoch=5)
    a = train(traces, offsets, cfg, progress=False).model.state_dict()
    b = train(traces, offsets, cfg, progress=False).model.state_dict()
    c = train(traces, offsets, dataclasses.replace(cfg, seed=1), progress=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["linear.weight"], c["linear.weight"])


def test_checkpoint_resume_matches_uninterrupted(tmp_path: Path, traces: np.ndarray,
                                                 offsets: tuple[int, ...]) -> None:
    cfg = dataclasses.replace(CFG, max_epochs=4, steps_per_epoch=5, patience=10)
    full = train(traces, offsets, cfg, progress=False)
    ckpt = tmp_path / "run.pt"
    train(traces, offsets, dataclasses.replace(cfg, max_epochs=2), progress=False, checkpoint=ckpt)
    resumed = train(traces, offsets, cfg, progress=False, checkpoint=ckpt)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k])
    with pytest.raises(ValueError, match="different training config"):
        train(traces, offsets, dataclasses.replace(cfg, lr=0.1), progress=False, checkpoint=ckpt)


def test_manifest_has_every_field(registry: Path, traces: np.ndarray) -> None:
    vdir = registry / "nlinear-c4-h8" / "v0001"
    manifest: dict[str, Any] = json.loads((vdir / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["format"] == "loopcast-engine" and manifest["format_version"] == 1
    assert (manifest["name"], manifest["version"]) == ("nlinear-c4-h8", "v0001")
    assert manifest["lead_times"] == list(range(1, 9)) and manifest["n_neurons"] == traces.shape[1]
    assert manifest["inputs"] == [{"name": "context", "shape": ["batch", 4, "neurons"], "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == ["batch", 8, "neurons"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-5 and manifest["parity"]["tolerance"] == 1e-5
    val = manifest["metrics"]["val"]
    assert val["model"]["mae"] < val["mean_baseline"]["mae"]
    assert manifest["data"]["fingerprint"].startswith("sha256:")
    names = {p.name for p in vdir.iterdir()}
    assert {"model.onnx", "manifest.json", "config.toml"} <= names <= {"model.onnx", "model.pt2", "manifest.json",
                                                                      "config.toml"}
    assert load_config(TrainConfig, vdir / "config.toml") == CFG


def test_onnx_matches_torch_on_same_input(registry: Path, trained: TrainResult) -> None:
    session = ort.InferenceSession(str(registry / "nlinear-c4-h8" / "v0001" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(0, 0.5, size=(3, 4, 33)).astype(np.float32)  # other B and N
    got = session.run(["forecast"], {"context": x})[0]
    with torch.no_grad():
        want = trained.model(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 8, 33)
    assert np.max(np.abs(got - want)) <= 1e-5


def test_second_export_is_v0002_and_resolved(registry: Path, trained: TrainResult,
                                             traces: np.ndarray) -> None:
    path = export_engine(trained.model, CFG, registry, traces.shape[1], trained.metrics,
                         "sha256:x", "synthetic:test")
    assert path == registry / "nlinear-c4-h8" / "v0002"
    assert versions(registry / "nlinear-c4-h8") == ["v0001", "v0002"]
    assert list_engines(registry) == {"nlinear-c4-h8": ["v0001", "v0002"]}
    assert resolve_engine(registry / "nlinear-c4-h8") == path
    assert not [p for p in (registry / "nlinear-c4-h8").iterdir() if p.name.startswith(".")]
    engine = OnnxEngine(registry / "nlinear-c4-h8")
    assert engine.version == "nlinear-c4-h8/v0002"


def test_parity_failure_raises(registry: Path) -> None:
    torch.manual_seed(123)
    other = NLinear(NLinearConfig(4, 8)).eval()
    x = np.ones((1, 4, 5), dtype=np.float32)
    with pytest.raises(ExportError, match="max abs diff"):
        check_parity(registry / "nlinear-c4-h8" / "v0001" / "model.onnx", other, [(x,)])


def test_failed_export_leaves_no_version(tmp_path: Path, trained: TrainResult) -> None:
    with pytest.raises(ExportError, match="parity_input shape"):
        export_engine(trained.model, CFG, tmp_path, 64, {}, "sha256:x", "t",
                      parity_input=np.zeros((3, 64), dtype=np.float32))
    assert list_engines(tmp_path) == {}
    assert list((tmp_path / "nlinear-c4-h8").iterdir()) == []


@pytest.mark.parametrize("model", ["tsmixer", "timemix"])
def test_mixer_models_train_export_and_run_in_the_engine_runtime(model: str, tmp_path: Path, traces: np.ndarray,
                                                                 offsets: tuple[int, ...]) -> None:
    """TSMixer gets the data's neuron count from training; both export with parity and run in ORT."""
    cfg = dataclasses.replace(CFG, model=model, max_epochs=2)
    result = train(traces, offsets, cfg, progress=False)
    n = traces.shape[1]
    assert getattr(result.model.config, "n_neurons", n) == n
    path = export_engine(result.model, cfg, tmp_path, n, result.metrics, data_fingerprint(traces, offsets),
                         "synthetic:test", parity_input=first_window(traces, offsets, cfg))
    engine = OnnxEngine(path)
    assert engine.manifest.model == model
    window = first_window(traces, offsets, cfg)
    with torch.no_grad():
        expected = result.model(torch.from_numpy(window)[None])[0].numpy()
    np.testing.assert_allclose(engine.run(window), expected, atol=1e-5)


# ------------------------------------------------------------------------------------- model_options


def test_model_options_from_toml_table_and_dotted_override(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nmodel = "tsmixer"\n\n[train.model_options]\nmlp_dim = 32\nrevin = true\n')
    cfg = load_settings(toml, ["train.model_options.n_blocks=1", "train.model_options.mlp_dim=128"]).train
    assert cfg.model_options == {"mlp_dim": 128, "revin": True, "n_blocks": 1}
    assert cfg.model_config(n_neurons=7) == {"context": 4, "horizon": 8, "n_neurons": 7, "mlp_dim": 128,
                                             "revin": True, "n_blocks": 1}
    dump_toml(cfg, tmp_path / "train.toml")
    assert load_config(TrainConfig, tmp_path / "train.toml") == cfg


@pytest.mark.parametrize("options, message", [
    ({"mlp_dims": 3}, r"model_options \['mlp_dims'\] are not options of model 'tsmixer'; its options: "
                      r"\['dropout', 'mlp_dim', 'n_blocks', 'revin', 'time_only'\]"),
    ({"context": 8}, r"model_options \['context'\] are set by \[train\] and the data"),
    ({"mlp_dim": "big"}, r"model.tsmixer.mlp_dim: expected an integer"),
    ({"mlp_dim": 0}, r"mlp_dim must be >= 1"),
])
def test_bad_model_options_fail_when_the_config_is_built(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(model="tsmixer", model_options=options)
    key, value = next(iter(options.items()))
    with pytest.raises(ConfigError, match=message):   # when [train] is read (the commands that train, at start)
        _ = load_settings([], ['train.model="tsmixer"', f"train.model_options.{key}={json.dumps(value)}"]).train


def test_model_options_reach_the_trained_model(traces: np.ndarray, offsets: tuple[int, ...]) -> None:
    cfg = dataclasses.replace(CFG, model="tsmixer", max_epochs=1, steps_per_epoch=2,
                              model_options={"mlp_dim": 16, "n_blocks": 1})
    model_cfg: Any = train(traces, offsets, cfg, progress=False).model.config
    assert (model_cfg.mlp_dim, model_cfg.n_blocks, model_cfg.n_neurons) == (16, 1, traces.shape[1])


# ---------------------------------------------------------------------------------------- covariates


@dataclasses.dataclass(frozen=True)
class TinyCovConfig:
    context: int = 4
    horizon: int = 8
    n_covariates: int = 0


class TinyCov(torch.nn.Module):
    """Forecast = a linear map of the context over time + a linear map of the future covariates."""

    uses_covariates = True

    def __init__(self, config: TinyCovConfig) -> None:
        super().__init__()
        self.config = config
        self.time = torch.nn.Linear(config.context, config.horizon)
        self.cov = torch.nn.Linear(config.n_covariates, 1)

    def forward(self, x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        c, h = self.config.context, self.config.horizon
        assert cov.shape == (x.shape[0], c + h, self.config.n_covariates), cov.shape
        return self.time(x.transpose(1, 2)).transpose(1, 2) + self.cov(cov[:, c:])  # (B, H, N)


@pytest.fixture
def tinycov(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(model_registry.MODELS, "tinycov", (TinyCovConfig, TinyCov))
    monkeypatch.setitem(model_registry._ALL, "tinycov", (TinyCovConfig, TinyCov))


@pytest.fixture(scope="module")
def stimuli(traces: np.ndarray) -> np.ndarray:
    """(T, 3) seeded stimulus covariates."""
    return np.random.default_rng(5).uniform(0, 1, size=(traces.shape[0], 3)).astype(np.float32)


def test_covariate_model_trains_on_covariate_windows(tinycov: None, traces: np.ndarray, offsets: tuple[int, ...],
                                                     stimuli: np.ndarray) -> None:
    cfg = dataclasses.replace(CFG, model="tinycov", max_epochs=2, steps_per_epoch=5)
    assert cfg.uses_covariates and not CFG.uses_covariates
    assert cfg.model_config(n_neurons=64, n_covariates=3) == {"context": 4, "horizon": 8, "n_covariates": 3}
    driven = traces + 0.5 * stimuli[:, :1]
    result = train(driven, offsets, cfg, progress=False, covariates=stimuli)
    model_cfg: Any = result.model.config
    assert model_cfg.n_covariates == 3
    assert len(result.metrics["val"]["model"]["mae_per_step"]) == cfg.horizon
    starts = np.array([10, 57, 300])
    x, y = gather_windows(driven, starts, 4, 8)
    cov = np.stack([stimuli[s:s + 12] for s in starts])
    with torch.no_grad():
        want = (result.model(torch.from_numpy(x), torch.from_numpy(cov)) - torch.from_numpy(y)).abs()
    got = mae_per_step(result.model, driven, starts, 4, 8, batch_size=2, covariates=stimuli)
    np.testing.assert_allclose(got, want.mean(dim=(0, 2)).numpy(), rtol=1e-5)
    context, window_cov = first_window_with_covariates(driven, offsets, cfg, stimuli)
    assert context.shape == (4, 64) and window_cov.shape == (12, 3)
    np.testing.assert_array_equal(context, first_window(driven, offsets, cfg))


def test_held_future_covariates_train_score_and_export_as_the_loop_serves(
        tinycov: None, traces: np.ndarray, offsets: tuple[int, ...], stimuli: np.ndarray, tmp_path: Path) -> None:
    """future_covariates = "held": the model sees the last context frame's stimulus for every future step
    in training and scoring, and the engine's manifest says so."""
    cfg = dataclasses.replace(CFG, model="tinycov", max_epochs=2, steps_per_epoch=5, future_covariates="held")
    driven = traces + 0.5 * stimuli[:, :1]
    result = train(driven, offsets, cfg, progress=False, covariates=stimuli)
    starts = np.array([10, 57, 300])
    x, y = gather_windows(driven, starts, 4, 8)
    held = np.stack([np.concatenate([stimuli[s:s + 4], np.repeat(stimuli[s + 3:s + 4], 8, axis=0)]) for s in starts])
    with torch.no_grad():
        want = (result.model(torch.from_numpy(x), torch.from_numpy(held)) - torch.from_numpy(y)).abs()
    got = mae_per_step(result.model, driven, starts, 4, 8, batch_size=2, covariates=stimuli, future="held")
    np.testing.assert_allclose(got, want.mean(dim=(0, 2)).numpy(), rtol=1e-5)
    assert not np.allclose(got, mae_per_step(result.model, driven, starts, 4, 8, covariates=stimuli))
    _, window_cov = first_window_with_covariates(driven, offsets, cfg, stimuli)
    np.testing.assert_array_equal(window_cov[4:], np.repeat(window_cov[3:4], 8, axis=0))
    path = export_engine(result.model, cfg, tmp_path, driven.shape[1], {}, "sha256:x", "test",
                         parity_input=first_window_with_covariates(driven, offsets, cfg, stimuli))
    assert json.loads((path / "manifest.json").read_text())["future_covariates"] == "held"
    with pytest.raises(ValueError, match="future_covariates must be one of"):
        dataclasses.replace(CFG, future_covariates="later")


def test_covariate_model_without_covariates_is_a_clear_error(tinycov: None, traces: np.ndarray,
                                                             offsets: tuple[int, ...], stimuli: np.ndarray) -> None:
    cfg = dataclasses.replace(CFG, model="tinycov", max_epochs=1)
    with pytest.raises(ValueError, match="model 'tinycov' uses stimulus covariates: pass covariates"):
        train(traces, offsets, cfg, progress=False)
    with pytest.raises(ValueError, match=r"covariates must be a \(T=800, K\) array, got \(799, 3\)"):
        train(traces, offsets, cfg, progress=False, covariates=stimuli[1:])
    model = TinyCov(TinyCovConfig(4, 8, 3))
    with pytest.raises(ValueError, match="TinyCov uses stimulus covariates"):
        mae_per_step(model, traces, np.array([0]), 4, 8)


class FakeRecording:
    def __init__(self, traces: np.ndarray, offsets: tuple[int, ...], stimuli: np.ndarray) -> None:
        self._traces, self.condition_offsets, self._stimuli = traces, offsets, stimuli
        self.root = "fake://recording"

    def traces(self) -> np.ndarray:
        return self._traces

    def stimuli(self) -> np.ndarray:
        return self._stimuli


def test_workflow_records_n_covariates_and_export_rebuilds_with_it(
        tinycov: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, traces: np.ndarray,
        offsets: tuple[int, ...], stimuli: np.ndarray) -> None:
    tcfg = dataclasses.replace(CFG, model="tinycov", max_epochs=1, steps_per_epoch=3)
    cfg = LoopcastConfig(train=tcfg, paths=PathsConfig(engines=str(tmp_path / "engines")))
    rec = FakeRecording(traces, offsets, stimuli)
    result, ckpt = workflows.train_on_recording(cfg, rec, tmp_path, progress=False)  # type: ignore[arg-type]
    assert torch.load(ckpt, weights_only=False)["n_covariates"] == 3
    seen: dict[str, Any] = {}

    def fake_export(model: torch.nn.Module, *args: Any, parity_input: Any = None, **kw: Any) -> Path:
        seen.update(model=model, parity_input=parity_input)
        return tmp_path / "engine"

    monkeypatch.setattr(workflows, "export_engine", fake_export)
    assert workflows.export_checkpoint(cfg, ckpt, rec) == tmp_path / "engine"  # type: ignore[arg-type]
    assert seen["model"].config.n_covariates == 3
    for k, v in result.model.state_dict().items():
        assert torch.equal(seen["model"].state_dict()[k], v)
    context, cov = seen["parity_input"]
    assert context.shape == (4, traces.shape[1]) and cov.shape == (12, 3)


def test_only_rank_0_writes_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, traces: np.ndarray,
                                        offsets: tuple[int, ...], trained: TrainResult) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(workflows, "train", lambda *a, **kw: trained)
    monkeypatch.setattr(workflows, "export_engine", lambda *a, **kw: pytest.fail("rank 1 exported"))
    cfg = LoopcastConfig(train=CFG, paths=PathsConfig(engines=str(tmp_path / "engines")))
    _, ckpt = workflows.train_on_recording(cfg, FakeRecording(traces, offsets, traces[:, :2]), tmp_path,  # type: ignore[arg-type]
                                           progress=False)
    assert ckpt == tmp_path / "model.pt" and list(tmp_path.iterdir()) == []
    assert workflows.export_checkpoint(cfg, ckpt) == tmp_path / "engines" / "nlinear-c4-h8"
