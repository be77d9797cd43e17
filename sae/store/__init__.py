"""store component."""
