"""Native CPU kernels (C extensions built at install) for the decode hot path, with Python wrappers."""
