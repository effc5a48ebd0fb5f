"""Evaluating circuits: prune metrics over circuit sizes, areas under their curves, MIB's
CPR and CMD, ROC curves against official circuits, and agreement between algorithms.

All functions return data (no plotting).
"""
