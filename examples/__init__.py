"""Runnable examples (docs/evaluate-your-defense.md)."""
