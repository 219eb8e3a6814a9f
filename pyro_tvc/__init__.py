"""pyro-tvc: Variational Task Vector Composition as a Pyro probabilistic program."""
__version__ = "0.1.0"
