"""One model replica: model code, weight loading, paged KV cache, scheduler, sampler.

Knows nothing of Ray, gRPC or HTTP. Offline use::

    from pdserve.engine import LLM, SamplingParams
    outs = LLM(model="ernie-4.5-0.3b", load_format="dummy").generate([[1, 2, 3]], SamplingParams(max_tokens=8))
"""

from pdserve.engine.block_pool import KVCacheEvent
from pdserve.engine.engine import Engine, EngineStats
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm import LLM
from pdserve.engine.outputs import CompletionOutput, KVPayload, Logprob, RequestDelta, RequestOutput
from pdserve.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "KVCacheEvent",
    "KVPayload",
    "Logprob",
    "RequestDelta",
    "RequestOutput",
    "SamplingParams",
]
