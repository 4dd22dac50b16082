"""Base layer: the recipe schema and files, the run folder, paths, safe readers, errors and the launched processes.

Imports nothing above it, and no torch at import time (`validate` and `--help` stay fast).
"""
