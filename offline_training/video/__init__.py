"""The volumetric video forecaster: preparing downsampled dF/F volumes, training the video UNet, evaluating it on
traces, and exporting it to an engine.
"""
