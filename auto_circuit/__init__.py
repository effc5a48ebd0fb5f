"""auto_circuit: find and test circuits in transformer language models."""

from auto_circuit import autocircuit_paths

autocircuit_paths.install()
