"""Reporting: plots, overlays and the HTML evaluation report."""
