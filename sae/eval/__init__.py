"""eval component."""
