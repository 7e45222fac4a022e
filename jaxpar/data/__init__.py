"""Data files shipped with jaxpar (the default byte-level corpus)."""
