"""harvest component."""
