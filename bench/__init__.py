"""mlink.bench."""
