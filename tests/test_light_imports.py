"""The real-time processes stay light: `loopcast run`, `loopcast controller` and `loopcast sim` never
import torch, loopcast.models or loopcast.offline_training unless the config asks for a torch runtime
or backend (pipeline.forecast.runtime, pipeline.preprocess.backend).

Each case starts a fresh interpreter that does what the command does before its loop: main()'s config
step (`cli.command_settings`: the -c files, the -s overrides, the training sections the command reads),
then the command's own start-up (run: the pipeline with its engine loaded and warmed up; controller: the
controller and its policy; sim: the whole command, for a few frames), and prints the heavy modules
loaded by then.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from loopcast.settings import load_settings, new_run_dir, training_sections

pytestmark = pytest.mark.timeout(180)

HEAVY = ("torch", "loopcast.offline_training", "loopcast.models")

PROBE = r'''
import json, sys
sys.path[:0] = {path!r}
for name in {imports!r}:
    __import__(name)
from loopcast import app, cli
args = cli.build_parser().parse_args({argv!r})
cfg = cli.command_settings(args)
{start}
heavy = {heavy!r}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith(heavy[1:]))))
'''

# What each command builds before its loop (loopcast/cli.py cmd_run, cmd_controller, cmd_sim).
START = {
    "run": '''
import numpy as np
seg = np.zeros(cfg.rig.shape, np.int32)
for i in range({n}):                      # one-voxel neurons, as many as the engine takes
    seg[2 * i, 0, 0] = i + 1
metrics = app.process_metrics(cfg, "run")
app.build_pipeline(cfg, metrics, seg).close()
metrics.close()
runtime = {{"onnxruntime": "onnx_runtime", "torch": "torch_runtime"}}[cfg.pipeline.forecast.runtime]
assert f"loopcast.realtime.engines.{{runtime}}" in sys.modules, "the engine was not loaded"
''',
    "controller": '''
import numpy as np
class Recording:                            # what the controller reads of one: neurons and ensembles
    n_neurons = 40
    def ground_truth(self, name):
        return np.arange(40) % 4
metrics = app.process_metrics(cfg, "controller")
app.build_controller(cfg, metrics, Recording())
metrics.close()
''',
    "sim": '''
from pathlib import Path
assert cli.cmd_sim(cfg, args, Path({run_dir!r})) == 0
''',
}


def heavy_modules(argv: list[str], tmp: Path, *, n_neurons: int = 10, path: tuple[str, ...] = (),
                  imports: tuple[str, ...] = ()) -> list[str]:
    """The heavy modules loaded once the command `argv` has started (see the module docstring);
    `imports` are imported first (from `path`), to show that a stray import is seen."""
    start = START[argv[0]].format(n=n_neurons, run_dir=str(tmp))
    code = PROBE.format(path=list(path), imports=list(imports), argv=argv, start=start, heavy=HEAVY)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def local(tmp: Path) -> list[str]:
    """Private endpoints and any free metrics port: nothing shared with other processes on the machine."""
    sets = [f'endpoints.frames="ipc://{tmp}/frames"', f'endpoints.forecasts="ipc://{tmp}/forecasts"',
            f'paths.runs="{tmp}/runs"', "metrics.run=0", "metrics.controller=0", "metrics.sim=0"]
    return [a for s in sets for a in ("-s", s)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, export_toy: Callable[..., Path]) -> Path:
    """A small exported forecast engine (ONNX graph and torch.export program)."""
    return export_toy("mean", tmp_path_factory.mktemp("registry"))


def run_argv(tmp: Path, engine: Path, *more: str) -> list[str]:
    return ["run", *local(tmp), "-s", f'pipeline.forecast.engine="{engine}"', *more]


def test_run_with_the_default_config_stays_light(tmp_path: Path, engine: Path) -> None:
    assert heavy_modules(run_argv(tmp_path, engine), tmp_path) == []


def test_controller_with_the_default_config_stays_light(tmp_path: Path) -> None:
    assert heavy_modules(["controller", *local(tmp_path)], tmp_path) == []


def test_sim_with_the_default_config_stays_light(tmp_path: Path) -> None:
    argv = ["sim", *local(tmp_path), "--no-mqtt", "--speed", "0", "--frames", "3", "-s", "sim.wait_subscribers=0"]
    assert heavy_modules(argv, tmp_path) == []


def test_a_config_saved_by_a_training_command_stays_light(tmp_path: Path) -> None:
    """`loopcast demo` starts its processes on the config.toml it saved, training sections resolved."""
    cfg = load_settings()
    training_sections(cfg)
    saved = new_run_dir(cfg, "train", str(tmp_path / "saved")) / "config.toml"
    assert "max_epochs" in saved.read_text()         # every key of [train], as resolved
    assert heavy_modules(["controller", "-c", str(saved), *local(tmp_path)], tmp_path) == []


def test_the_torch_runtime_does_load_torch(tmp_path: Path, engine: Path) -> None:
    """The check can fail: a config that asks for the torch runtime gets torch (and no training code)."""
    heavy = heavy_modules(run_argv(tmp_path, engine, "-s", 'pipeline.forecast.runtime="torch"'), tmp_path)
    assert "torch" in heavy
    assert not [m for m in heavy if m.startswith(HEAVY[1:])]


def test_a_stray_import_of_training_code_is_seen(tmp_path: Path) -> None:
    """The check can fail: a module on the way that imports training code is caught."""
    (tmp_path / "stray_import.py").write_text("import loopcast.offline_training.trace.train\n")
    heavy = heavy_modules(["controller", *local(tmp_path)], tmp_path, path=(str(tmp_path),),
                          imports=("stray_import",))
    assert {"torch", "loopcast.offline_training.trace.train", "loopcast.models.zoo"} <= set(heavy)
