"""Scoring landmarks against labels, and the preview picture."""
