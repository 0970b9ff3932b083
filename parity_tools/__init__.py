"""Helpers behind `parity.py`: the Axolotl config check and (later) the stack comparison."""
