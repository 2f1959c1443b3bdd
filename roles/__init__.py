"""Workers: Ray actors that host one engine in the prefill, decode or both role, and the KV
transfer between them."""
