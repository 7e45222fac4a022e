"""Training utilities: byte-level language-model data (the config-driven trainer is to come)."""
