"""Layer 0: the typed data, errors, config and catalog schema every other layer shares.

Plain pydantic (and numpy-free) code: no torch, no Ray, nothing that starts a model.
"""
