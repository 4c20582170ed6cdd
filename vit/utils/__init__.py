"""Helpers every layer may use: atomic file writes (``files``), value ranges of configuration (``ranges``) and
what the hardware runs natively (``hardware``)."""
