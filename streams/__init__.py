"""Breakwater: online detection of runaway LLM agents on Kafka, with circuit-breaker commands."""

__version__ = "0.1.0"
