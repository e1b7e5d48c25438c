"""The store role: ``base.py`` holds the interface, one module per backend."""
