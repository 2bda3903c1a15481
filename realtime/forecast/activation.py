"""Activation stage: context window -> activation engine -> per-neuron probabilities published on ZeroMQ.

An activation engine (manifest task "activation", e.g. QuantFormer's) predicts, per neuron, the
probability that its response over the next H frames meets the manifest's `activation` criterion
(e.g. mean dF/F above a threshold). The stage runs exactly like the trace forecast stage (same context
buffer, signal and stimulus covariates, hot swap) but publishes kind "activation" on
`activation/<model>`: header lead_times (H,) (the window), data (1, N) float32 probabilities. Latency
goes to `loopcast_stage_latency_seconds{stage="activation"}`, counts to
`loopcast_activations_published_total{model}`.
"""
from __future__ import annotations

from typing import Any

from loopcast.realtime.forecast.stage import ForecastStage


class ActivationStage(ForecastStage):
    """Stage 3 for an activation engine: (C, N [+ K]) window -> (1, N) probabilities, published."""

    task = "activation"
    kind = "activation"
    role = "activation predictor"

    def _counter(self) -> Any:
        return self.metrics.activations

    @property
    def window(self) -> int:
        """H: the number of future frames the served engine's probabilities are about."""
        return int(self.engine.manifest.horizon)
