"""demo component."""
