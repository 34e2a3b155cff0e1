"""criud.restore."""
