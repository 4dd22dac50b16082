"""The training run: pre-flight, the run itself, TRL's trainer, stopping, saving, metrics, progress, trackers.

Imports every layer below it (serving, model, data, core), never the commands.
"""
