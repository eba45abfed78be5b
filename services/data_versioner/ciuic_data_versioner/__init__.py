"""The ciuic data_versioner service."""
