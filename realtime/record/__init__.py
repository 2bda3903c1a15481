"""The experiment record, written while the loop runs: the controller's append-only audit log
(`audit`) and the pipeline's session store (`session`: per-frame timing and validity, the dF/F, the
published forecasts and the live forecast skill, `skill`). Formats: docs/record.md."""
