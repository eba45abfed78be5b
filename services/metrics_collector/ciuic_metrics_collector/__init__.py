"""The ciuic metrics_collector service."""
