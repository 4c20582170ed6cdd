"""Helpers every layer may use: atomic file writes (``files``) and value ranges of configuration (``ranges``)."""
