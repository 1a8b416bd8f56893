"""mlink.server."""
