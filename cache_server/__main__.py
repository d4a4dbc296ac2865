"""``python -m cache_server ARGS`` runs the ``kdcache`` command line."""

import sys

from cache_server.cli import main

sys.exit(main())
