"""Measurement: judges, metrics, suites."""
