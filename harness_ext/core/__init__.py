"""Foundation used by every layer: errors, cache paths, atomic writes and hashing, sandboxed templates, statistics, tokenizers."""
