"""The bus role: ``base.py`` holds the interface, one module per backend."""
