"""Tiny seeded fish and one synthesized recording shared by the replay tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.synth import SynthConfig, synthesize


@pytest.fixture(scope="session")
def tiny_fish() -> FishConfig:
    """48 x 32 x 8 grid, 150 neurons in 4 ensembles."""
    return FishConfig(seed=7, shape=(48, 32, 8), n_neurons=150, n_ensembles=4)


@pytest.fixture(scope="session")
def tiny_synth(tiny_fish: FishConfig) -> SynthConfig:
    return SynthConfig(fish=tiny_fish, n_frames=200, baseline_stride=4)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_synth: SynthConfig) -> Path:
    """Path of a complete synthesized recording (treat as read-only; copy it to break it)."""
    out = tmp_path_factory.mktemp("rec") / "tiny"
    synthesize(tiny_synth, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_recording(tiny_store: Path) -> Recording:
    return Recording.open(tiny_store)
