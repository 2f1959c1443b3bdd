"""Engine arguments: everything `LLM(...)` and a worker pass to build an `Engine`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.engine.context_cache_config import ContextCacheConfig
from pdserve.engine.expert_parallel.config import ExpertParallelConfig
from pdserve.engine.layers.linear import CPU_GEMM_BACKENDS
from pdserve.engine.quantization.config import QuantizationConfig
from pdserve.engine.spec_decode.config import SpeculativeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# The default KV pool: max_num_seqs sequences of 1/KV_POOL_WINDOW_FRACTION of the context window,
# capped at DEFAULT_KV_POOL_GIB (see EngineConfig.kv_pool_blocks).
KV_POOL_WINDOW_FRACTION = 16
DEFAULT_KV_POOL_GIB = 1.0


@dataclass
class EngineConfig:
    """Validated engine arguments (vLLM's names where vLLM has the same knob)."""

    model: str
    dtype: str = "auto"  # "auto": float32 on CPU, the checkpoint's dtype on GPU
    seed: int = 0
    load_format: str = "auto"
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # a directory; default: the model's own
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # The KV pool: kv_cache_blocks, else as many blocks as kv_cache_memory_gb holds, else sized
    # from the model (see kv_pool_tokens).
    kv_cache_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    max_model_len: int | None = None  # default: the model's, capped by the KV pool
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's setting
    device: str = "cpu"
    # Which BLAS runs fp32 CPU matmuls: "torch" (MKL), "openblas", or "auto" (OpenBLAS on AMD
    # CPUs, where MKL's small GEMMs are slow; MKL elsewhere). See layers/linear.py.
    cpu_gemm: str = "auto"
    progress: bool = True
    # {"method": "draft" | "mtp" | "ngram", "num_speculative_tokens": k, ...}; see SpeculativeConfig.
    speculative_config: dict[str, Any] | SpeculativeConfig | None = None
    # KV blocks of reused prefixes kept in Redis for any engine of the same model to load:
    # {"redis_url": ..., "max_bytes": ..., "ttl_s": ..., "min_reuse": ...}; see ContextCacheConfig.
    context_cache: dict[str, Any] | ContextCacheConfig | None = None
    # Weight-only quantization: "wint8", "wint4", "wint2", or {"method": ..., "group_size": ...,
    # "lm_head": ...}; see QuantizationConfig. None: full precision (or whatever a quantized
    # checkpoint declares).
    quantization: str | dict[str, Any] | QuantizationConfig | None = None
    # {"size": N, "num_redundant_experts": R, "rebalance_interval_s": s}; see ExpertParallelConfig.
    # size > 1 runs one MoE replica on N ranks (`LLM` spawns them; see expert_parallel/group.py).
    expert_parallel: dict[str, Any] | ExpertParallelConfig | None = None

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        if not isinstance(self.model, str) or not self.model:
            raise ValueError(
                f"model must be a checkpoint directory or a bundled model name, got {self.model!r}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if not isinstance(self.hf_overrides, dict):
            raise ValueError(
                f"hf_overrides must be a dict of config.json keys, got {type(self.hf_overrides).__name__}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            positive(name)
        for name in ("kv_cache_blocks", "max_model_len", "num_threads"):
            positive(name, allow_none=True)
        if self.cpu_gemm not in ("auto", *CPU_GEMM_BACKENDS):
            raise ValueError(f"cpu_gemm must be 'auto' or one of {CPU_GEMM_BACKENDS}, got {self.cpu_gemm!r}")
        if self.kv_cache_memory_gb is not None and not (
            isinstance(self.kv_cache_memory_gb, int | float) and self.kv_cache_memory_gb > 0
        ):
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        self.context_cache = ContextCacheConfig.from_value(self.context_cache)
        if self.context_cache.enabled and not self.enable_prefix_caching:
            raise ValueError(
                "context_cache loads blocks into the prefix cache: it needs enable_prefix_caching=True"
            )
        self.quantization = QuantizationConfig.from_value(self.quantization)
        self.expert_parallel = ExpertParallelConfig.from_dict(self.expert_parallel)
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(
                f"device must be a torch device such as 'cpu' or 'cuda:0', got {self.device!r}"
            ) from e

    @property
    def on_gpu(self) -> bool:
        """Whether the engine runs on a CUDA device (its worker then takes a GPU and NCCL transfers)."""
        return self.device.startswith("cuda")

    def kv_pool_blocks(self, block_bytes: int, model_max_len: int) -> int:
        """How many KV blocks this engine allocates, given one block's bytes and the model's window.

        Unless told (kv_cache_blocks, kv_cache_memory_gb), the pool holds max_num_seqs sequences of
        a sixteenth of the context window each (at least one whole window), and at most
        DEFAULT_KV_POOL_GIB: a fixed byte budget gave the 17 MB demo model a 1 GiB pool, most of
        each worker's memory, that it never filled.
        """
        if self.kv_cache_blocks is not None:
            return self.kv_cache_blocks
        if self.kv_cache_memory_gb is not None:
            return max(1, int(self.kv_cache_memory_gb * 2**30) // block_bytes)
        window = min(self.max_model_len or model_max_len, model_max_len)
        tokens = max(window, self.max_num_seqs * window // KV_POOL_WINDOW_FRACTION)
        blocks = -(-tokens // self.block_size)
        return max(1, min(blocks, int(DEFAULT_KV_POOL_GIB * 2**30) // block_bytes))

    def torch_dtype(self, checkpoint_dtype: str) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if torch.device(self.device).type == "cpu":
            # This CPU class has no fast bf16 matmul; fp32 is both faster and exact there.
            return torch.float32
        return DTYPES.get(checkpoint_dtype, torch.bfloat16)
