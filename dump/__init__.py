"""criud.dump."""
