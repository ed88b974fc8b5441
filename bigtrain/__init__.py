"""bigtrain runtime: what runs on every rank. Importing the package itself stays light (no torch)."""

__version__ = "0.1.0"
