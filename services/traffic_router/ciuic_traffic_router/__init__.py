"""The ciuic traffic_router service."""
