"""The ``spp`` command line: a thin click layer over the ``stages`` library."""
