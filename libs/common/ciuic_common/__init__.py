"""ciuic_common: the shared runtime of every ciuic service."""
