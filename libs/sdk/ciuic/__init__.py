"""ciuic SDK."""
