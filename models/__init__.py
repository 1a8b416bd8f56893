"""mlink.models."""
