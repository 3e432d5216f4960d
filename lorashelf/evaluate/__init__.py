"""Evaluation: score any model on held-out tasks; tables and reports."""
