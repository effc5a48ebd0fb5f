"""Completeness of a circuit: does it behave like the model when parts of both are
knocked out? (Wang et al. 2022, "Interpretability in the Wild", section 4.)"""
