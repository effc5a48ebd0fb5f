"""Official (hand-found) circuits of known tasks and ROC curves of algorithms against them.

The circuits live in ``official_circuits.circuits``; ``measure_roc`` compares any edge
ranking with one of them.
"""
