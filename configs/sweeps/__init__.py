"""Sweeps: each file defines `get_config(arg)` (the base config) and `sweep(arg)` (override dicts).

Run one with `python scripts/sweep.py --config=configs/sweeps/<file>.py[:arg]`; see gptjax/sweep.py.
"""
