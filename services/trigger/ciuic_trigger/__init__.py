"""The ciuic trigger service."""
