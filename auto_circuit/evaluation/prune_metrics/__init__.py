"""Prune metrics: one module per metric family and the registry ``PRUNE_METRIC_DICT``.

See :mod:`auto_circuit.evaluation.prune_metrics.metric_result` for the per-prompt API.
"""
