"""ROC figures, kept at AutoCircuit's path; they live in ``auto_circuit.visualize``.

Importing this module imports plotly lazily (only when a figure is made); no metric
module imports it.
"""

from auto_circuit.visualize.plots import roc_plot, task_roc_plot

__all__ = ["roc_plot", "task_roc_plot"]
