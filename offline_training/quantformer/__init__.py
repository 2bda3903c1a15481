"""QuantFormer: training its forecaster and activation heads and scoring activation predictions (AUROC) and
forecasts.
"""
