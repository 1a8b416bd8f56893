"""mlink.configs."""
