"""kdcache server side: the cache format, the build job, the HTTP server and the ``kdcache`` command."""

# Kept equal to pyproject's version; `kdcache --version` prefers the installed distribution's metadata.
__version__ = "0.1.0"
