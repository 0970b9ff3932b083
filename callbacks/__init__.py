"""Evaluation and logging shared by our trainer and Axolotl.

Keep this package import-light: `callbacks.metrics` is pure stdlib and is
imported by data tools and by Axolotl's environment.
"""
