"""The ciuic packager service."""
