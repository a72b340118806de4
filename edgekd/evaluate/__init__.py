"""Judging the result: teacher and reference models beside the shipped student, the benchmark, and the report."""
