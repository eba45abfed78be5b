"""The ciuic command."""
