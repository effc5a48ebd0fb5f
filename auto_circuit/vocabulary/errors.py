"""Errors raised for anything a user can get wrong."""


class CircuitError(ValueError):
    """Bad input to auto_circuit: the message says what is wrong and how to fix it."""
