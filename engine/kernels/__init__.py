"""Native CPU kernels (C extensions built at install) for the decode hot path, with Python wrappers."""

from collections.abc import Callable

# How a kernel wrapper gets threads: `parallel(fn, max_parts)` runs fn(part, parts) for every
# part at once, at most `max_parts` (None: as many as there are threads). `CpuGemm.parallel` is one.
CpuParallel = Callable[[Callable[[int, int], None], int | None], None]
