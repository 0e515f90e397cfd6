"""Corpora and calibration/evaluation windows; offline zero-shot tasks."""
