"""The engine: loading models, KV caches, prefix caching and decoding. Knows nothing of roles, judges or runs."""
