"""VTVC Pyro guides (importable as ``pyro_tvc.guides``)."""
