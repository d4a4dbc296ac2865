"""Peer loss functions vendored from their public sources for benchmarks/compare_peers.py (never library code).

Each module's header says where it came from (repository, path, commit) and its licence.
"""
