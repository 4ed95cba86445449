"""Placeholder until the implementation lands: registers nothing."""
