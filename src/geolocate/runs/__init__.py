"""Runs: one experiment end to end, its artifacts, dashboards and cross-run ranking."""
