"""The build room: ``kdcache build`` from options to a finished, verified cache.

Modules:
    options     BuildOptions, BuildInputError, the option / device / sequence-length checks, the layout.
    job         run_build: validation, the build lock, build / resume / repair, the summary.
    pipeline    teacher forward → targets → the background shard-writer thread.
    targets     compute_targets: top-k, logsumexp, NLL and entropy of a batch of logits (fp32, chunked).
    sampling    sampled / hybrid targets: the seed rule, per-sequence uniforms, CDF inversion, slot packing.
    writer      CacheWriter: the crash-safe, resumable writer, and what an output directory holds.
    assemble    the manifest from the per-shard journal entries.
    repair      which shards of a finished cache a rerun must rebuild.
    space       disk-space estimates and the full-disk error.
    teacher     loading a teacher from local safetensors files.
    sources     token data inputs → [N, T] sequences; text_inputs / text: documents and their tokenization.
    errors      DataError.
"""
