"""tabattn benchmark harness: `python -m bench <suite>` from the repository root.

See bench/README.md for the method and the meaning of every reported figure.
"""
