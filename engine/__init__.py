"""loraplex inference engine: torch only (no web or database imports)."""
