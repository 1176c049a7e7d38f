"""Forensic detectors as transformers models (filled in as the detectors land)."""
