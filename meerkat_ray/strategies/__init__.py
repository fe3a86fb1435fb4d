"""Registered variants of the round: aggregation rules (`aggregation.py`) and client-selection
policies (`policies.py`). Light on purpose (numpy, no torch): config validation reads the registries."""
