"""Offline evaluation: ranking metrics, baselines, breakdowns, embedding health, the report."""
