"""Trace forecasters (linear, TSMixer, TiDE): training on windows of the recording's traces and export to an engine."""
