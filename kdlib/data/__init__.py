"""Reading a cache on the training side, one concept per module.

``sources`` (where stored shard bytes come from), ``store`` (each shard decoded once into a memory-mapped
copy), ``cache`` (``CacheReader``, ``LocalCache``), ``remote`` (``RemoteCache`` over HTTP) and ``open``
(``open_cache``, the one module that knows both kinds). Nothing is imported here, so importing one module
does not pull in the others (``httpx`` only with ``remote``).
"""
