"""The console script: synth -> train -> export as separate commands, and clear errors (exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopcast.cli import main
from loopcast.settings import DEFAULT_CONFIG


def tiny(tmp: Path) -> list[str]:
    sets = [f'paths.recording="{tmp}/rec"', f'paths.engines="{tmp}/engines"', f'paths.runs="{tmp}/runs"',
            "rig.shape=[32, 24, 8]", "synth.fish.n_neurons=120", "synth.fish.n_ensembles=3",
            "synth.n_frames=400", "train.horizon=4", "train.max_epochs=2"]
    return [a for s in sets for a in ("-s", s)]


def test_synth_train_export_as_separate_commands(tmp_path: Path) -> None:
    assert main(["synth", *tiny(tmp_path)]) == 0
    assert (tmp_path / "rec" / "loopcast.json").is_file()
    assert main(["train", *tiny(tmp_path), "--run-dir", str(tmp_path / "runs" / "t")]) == 0
    ckpt = tmp_path / "runs" / "t" / "model.pt"
    assert ckpt.is_file() and (tmp_path / "runs" / "t" / "config.toml").is_file()
    assert not (tmp_path / "engines").exists()          # train alone does not export
    assert main(["export", *tiny(tmp_path), "--checkpoint", str(ckpt)]) == 0
    manifest = json.loads((tmp_path / "engines" / "nlinear-c4-h4" / "v0001" / "manifest.json").read_text())
    assert manifest["n_neurons"] == 120 and manifest["parity"]["max_abs_diff"] <= 1e-5
    assert main(["synth", *tiny(tmp_path)]) == 2          # refuses to overwrite without --overwrite


@pytest.mark.parametrize("argv, message", [
    (["run"], "make a synthetic one with `loopcast synth`"),
    (["export", "--checkpoint", "nowhere.pt"], "no checkpoint at nowhere.pt"),
    (["sim", "-s", "sim.sped=2"], "unknown key 'sim.sped' (did you mean 'speed'?)"),
])
def test_user_errors_exit_2_with_a_clear_message(tmp_path: Path, argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "-s", f'paths.recording="{tmp_path}/missing"', "-s", f'paths.runs="{tmp_path}/runs"']) == 2
    assert message in capsys.readouterr().err


BROKEN = Path(__file__).resolve().parent / "broken" / "configs"


@pytest.mark.parametrize("broken, command", [("bad_train_device", "train"), ("bad_train_device", "export"),
                                             ("bad_quantformer_model_option", "train-quantformer")])
def test_a_broken_training_section_stops_the_commands_that_train_not_the_loop(
        tmp_path: Path, broken: str, command: str, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """A training section is checked by the commands that read it, before they start (no run
    directory); `loopcast run` does not import it and goes on (here to the missing recording)."""
    monkeypatch.chdir(tmp_path)
    path = BROKEN / f"{broken}.toml"
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    argv = ["-c", str(DEFAULT_CONFIG), "-c", str(path), "-s", f'paths.recording="{tmp_path}/missing"',
            "-s", f'paths.runs="{tmp_path}/runs"']
    extra = ["--checkpoint", "nowhere.pt"] if command == "export" else []
    assert main([command, *argv, *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert "make a synthetic one with `loopcast synth`" in err and expected not in err


@pytest.mark.timeout(60)
def test_control_command_drives_a_running_controller(loop_setup, mqtt_broker) -> None:
    """`loopcast control`: arm, a latching stop (arm refused until reset), reset, arm."""
    import asyncio

    from loopcast import app
    from loopcast.control import send_control
    from loopcast.realtime.metrics import Metrics
    from loopcast.settings import load_settings

    cfg = load_settings(overrides=[*loop_setup[1], f"mqtt.port={mqtt_broker.port}", 'rig.name="ctltest"'])

    async def session() -> list[tuple[bool, bool]]:
        controller = app.build_controller(cfg, Metrics("controller"), app.open_recording(cfg))
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        await asyncio.wait_for(controller.ready.wait(), 10)
        seen = []
        for action in ("arm", "stop", "arm", "reset", "arm"):
            status = await send_control(cfg, action, timeout_s=5)
            seen.append((status["armed"], status["estop"]))
        stop.set()
        await task
        return seen

    assert asyncio.run(session()) == [(True, False), (False, True), (False, True), (False, False), (True, False)]


def test_replay_refuses_volumes_that_are_not_the_rig_shape_or_missing(tmp_path: Path, loop_setup,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Streaming volumes the pipeline would reject one by one is refused up front, naming both shapes;
    a volume array the recording lacks is named with what it does have."""
    base = [*(a for s in loop_setup[1] for a in ("-s", s)), "-s", f'paths.runs="{tmp_path}/runs"',
            "-s", "metrics.replay=0"]
    assert main(["replay", *base, "-s", "rig.shape=[64, 32, 8]"]) == 2
    assert "volumes (level 0) are [48, 32, 8] uint16 but [rig] says [64, 32, 8]" in capsys.readouterr().err
    assert main(["replay", *base, "--array", "df_over_f", "--level", "2"]) == 2
    assert "df_over_f" in capsys.readouterr().err


def test_train_on_a_zapbench_layout_copy_by_url(tmp_path: Path) -> None:
    """`loopcast train --data <url>`: a ZAPBench-layout store without loopcast.json (what
    gs://zapbench-release/volumes/20240930 is) goes through the same path as a local synthetic one:
    ZAPBench's condition offsets, its stimulus covariates for TiDE, export with a covariates input."""
    import numpy as np

    from loopcast.replay.fish import ZAPBENCH_CONDITION_OFFSETS
    from loopcast.replay.store import create_array
    t, n = ZAPBENCH_CONDITION_OFFSETS[-1], 6
    rng = np.random.default_rng(0)
    data = tmp_path / "zapbench"
    traces = create_array(data / "traces", (t, n), "float32", (512, 512), labels=("t", "f"), codec=None)
    traces.write(np.cumsum(rng.normal(0, 0.02, (t, n)), axis=0).astype(np.float32)).result()
    stim = create_array(data / "stimuli_features", (t, 26), "float32", (t, 26), zarr_format=2)
    stim.write(rng.uniform(0, 1, (t, 26)).astype(np.float32)).result()
    sets = ['train.model="tide"', "train.horizon=4", "train.max_epochs=1", "train.steps_per_epoch=3",
            f'paths.engines="{tmp_path}/engines"', "train.model_options.hidden=8"]
    argv = ["train", "--data", f"file://{data}", "--export", "--run-dir", str(tmp_path / "run")]
    assert main([*argv, *[a for s in sets for a in ("-s", s)]]) == 0
    manifest = json.loads((tmp_path / "engines" / "tide-c4-h4" / "v0001" / "manifest.json").read_text())
    assert manifest["inputs"][1] == {"name": "covariates", "shape": ["batch", 8, 26], "dtype": "float32"}
    assert manifest["data"]["source"] == str(data)  # the --data store, not paths.recording
    assert manifest["metrics"]["val"]["conditions"] == ["gain", "dots", "flash", "turning", "position",
                                                        "open loop", "rotation", "dark"]


def video_tiny(tmp: Path) -> list[str]:
    """A small fish with nuclei that survive 4x striding, and a tiny video UNet trained for a few steps."""
    sets = [f'paths.recording="{tmp}/rec"', f'paths.engines="{tmp}/engines"', f'paths.runs="{tmp}/runs"',
            "rig.shape=[48, 40, 8]", "synth.fish.n_neurons=80", "synth.fish.n_ensembles=4",
            "synth.fish.nucleus_radius_vox=[3.0, 3.0, 1.0]", "synth.n_frames=400", "prepare_video.stride=4",
            "train_video.context=4", "train_video.horizon=4", "train_video.steps=6", "train_video.val_every=3",
            "train_video.val_windows=8", "train_video.threads=1", "train_video.max_context=8",
            "train_video.model_options.features=8", "train_video.model_options.features_sr=8",
            "train_video.model_options.groups=4", "train_video.model_options.lead_dim=8",
            "train_video.model_options.downsample=[[2, 2, 1]]", "train_video.data.crop_y=8"]
    return [a for s in sets for a in ("-s", s)]


def test_video_prepare_train_evaluate_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = video_tiny(tmp_path)
    assert main(["synth", *argv]) == 0
    assert main(["train-video", *argv]) == 2                       # no dF/F volumes yet
    assert "loopcast prepare-video" in capsys.readouterr().err
    assert main(["prepare-video", *argv]) == 0
    assert (tmp_path / "rec" / "df_over_f_xyz_chunked" / "s2" / "zarr.json").is_file()
    assert main(["prepare-video", *argv]) == 2                     # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train-video", *argv, "--run-dir", str(tmp_path / "runs" / "v")]) == 0
    engine = tmp_path / "engines" / "video_unet-c4-h4"
    manifest = json.loads((engine / "v0001" / "manifest.json").read_text())
    assert manifest["task"] == "video" and manifest["video"]["input_shape"] == [12, 8, 8]
    assert (tmp_path / "runs" / "v" / "best.pt").is_file()
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["evaluate", *argv, "--engines", str(engine), "--baselines", "mean", "--out", str(out),
                 "-s", "train.max_context=8", "-s", "train.horizon=4"]) == 0
    table = capsys.readouterr().out
    assert "video_unet-c4-h4/v0001" in table and "mean-c4" in table
    assert (out / "table.md").is_file() and (out / "figure.png").is_file()


def test_train_sbm_and_quantformer_commands(qf_sbm_engines) -> None:
    """The commands ran (exit 0) in the session fixture `qf_sbm_engines` (tests/conftest.py), which
    tests/test_e2e_activation.py's loop shares: here, what they printed and wrote."""
    out = qf_sbm_engines.stdout["train-sbm"]
    assert "next-step MAE (train_conditions): SBM" in out and "calibration (train_conditions)" in out
    assert qf_sbm_engines.sbm.is_dir() and (qf_sbm_engines.runs["train-sbm"] / "metrics.json").is_file()
    assert "test: activation AUROC" in qf_sbm_engines.stdout["train-quantformer"]
    assert qf_sbm_engines.quantformer.is_dir()
