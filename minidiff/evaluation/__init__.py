"""Scoring answers, benchmark tasks with error bars, and the lm-eval harness."""
