"""Real services on loopback for development, tests and ``up --profile scaled``.

``base.py`` holds the interface; one module per service installs it the first
time (Debian packages, Maven Central jars), starts it on 127.0.0.1 on a free
port with its data in a temporary directory, and stops it.
"""
