"""The ciuic scheduler service."""
