"""Data preparation, validation, conversion and generation: `python -m data_tools --help`."""
