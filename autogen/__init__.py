"""Kernel instantiation generator: `python -m autogen` writes every generated file."""
