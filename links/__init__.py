"""mlink.links."""
