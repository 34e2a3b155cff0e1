"""criud.api."""
