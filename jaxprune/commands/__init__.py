"""Sub-commands of the ``jaxprune`` command line."""
