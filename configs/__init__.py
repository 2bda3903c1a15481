"""The default configs, shipped inside the package: loopcast.toml (every stage's values; the code's defaults equal
them), layers for other scales and models, and the monitoring stack's Prometheus and Grafana files."""
