"""Sample data generators (not part of the installed package)."""
