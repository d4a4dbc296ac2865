"""The data room of kdlib: shard sources, the decoded-shard store, open_cache and the cache classes."""
