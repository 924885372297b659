"""The ``spp`` command line: a thin click layer over the ``stages`` library."""
import time

# When this process reached sppnet's code (first line of the ``spp`` entry point): where a detection profile's
# start-up phase begins.
STARTED = time.perf_counter()
