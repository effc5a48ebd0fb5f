"""The metric-vs-circuit-size figure, kept at AutoCircuit's path; it lives in
``auto_circuit.visualize``. No metric module imports it."""

from auto_circuit.visualize.plots import edge_patching_plot

__all__ = ["edge_patching_plot"]
