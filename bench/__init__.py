"""Benchmarks: each script measures its contenders side by side and appends a section to RESULTS.md."""
