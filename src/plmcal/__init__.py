"""Calibrate post-trained LLMs (PoLMs) with their pre-trained counterparts (PLMs)."""

__version__ = "0.1.0"
