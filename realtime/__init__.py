"""The real-time side: ingest, preprocessing, spike inference, engine runtimes, forecast stages, the controller and
metrics, and the pipeline that runs one frame through them. Loads exported engines, never training code
(loopcast.offline_training) or model code (loopcast.models)."""
