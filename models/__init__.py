"""VTVC Pyro models (importable as ``pyro_tvc.models``)."""
