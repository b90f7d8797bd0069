"""The command-line programs (``itune-train``, ``itune-convert`` ...), one module each.

Each module only parses its flags and calls into the library; ``python -m itune.cli.<name>``
runs the same program as its console script.
"""
