"""The ciuic gpu_agent service."""
