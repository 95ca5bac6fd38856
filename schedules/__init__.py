"""Hand-written kernels: one file per kernel family, each with its numpy reference beside it.

Schedules know shapes, dtypes and targets, never models. Installed as ``ferrum.schedules``.
"""
