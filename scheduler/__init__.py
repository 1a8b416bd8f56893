"""mlink.scheduler."""
