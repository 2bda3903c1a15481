"""Forecast stages: the context ring buffer, the trace forecaster stage that runs an engine per frame and publishes
forecasts, QuantFormer's activation stage, and the volumetric video forecaster with the reduction of its predicted
volumes to per-neuron traces."""
