"""The wire: one msgpack + raw-buffer codec for every ZeroMQ message (frames, forecasts, triggers), the ZeroMQ publisher
and subscriber that carry it, and the shared-memory ring that carries full-resolution volume payloads on one host while
only headers cross ZeroMQ. Imports nothing else of loopcast."""
