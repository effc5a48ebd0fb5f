"""Optional native CPU kernels for the engine's table products (``table_ops``), built
ahead of time with ``python -m auto_circuit.engine.kernels build`` and used only with
``AUTO_CIRCUIT_NATIVE=1`` or ``table_ops.enable()``."""
