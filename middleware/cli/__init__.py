"""``mw-cli``: a thin command line over the public API."""
