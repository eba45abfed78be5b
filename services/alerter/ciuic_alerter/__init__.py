"""The ciuic alerter service."""
