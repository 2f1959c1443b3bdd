"""One model replica: model code, weight loading, paged KV cache, scheduler, sampler.

Knows nothing of Ray, gRPC or HTTP. Offline use::

    from pdserve.engine import LLM, SamplingParams
    outs = LLM(model="ernie-4.5-0.3b", load_format="dummy").generate([[1, 2, 3]], SamplingParams(max_tokens=8))

The names below load on first use (PEP 562): the router and the gateway import the plain data
types (`SamplingParams`, `RequestDelta`, ...) without loading torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers (`X as X` marks a re-export)
    from pdserve.engine.block_pool import KVCacheEvent as KVCacheEvent
    from pdserve.engine.engine import Engine as Engine
    from pdserve.engine.engine_config import EngineConfig as EngineConfig
    from pdserve.engine.kv_handoff import KVPayload as KVPayload
    from pdserve.engine.llm import LLM as LLM
    from pdserve.engine.outputs import CompletionOutput as CompletionOutput
    from pdserve.engine.outputs import Logprob as Logprob
    from pdserve.engine.outputs import RequestDelta as RequestDelta
    from pdserve.engine.outputs import RequestOutput as RequestOutput
    from pdserve.engine.sampling_params import GuidedDecoding as GuidedDecoding
    from pdserve.engine.sampling_params import SamplingParams as SamplingParams
    from pdserve.engine.stats import EngineStats as EngineStats

# Each public name and the module that defines it.
_MODULE_OF = {
    "LLM": "pdserve.engine.llm",
    "CompletionOutput": "pdserve.engine.outputs",
    "Engine": "pdserve.engine.engine",
    "EngineConfig": "pdserve.engine.engine_config",
    "EngineStats": "pdserve.engine.stats",
    "KVCacheEvent": "pdserve.engine.block_pool",
    "KVPayload": "pdserve.engine.kv_handoff",
    "Logprob": "pdserve.engine.outputs",
    "RequestDelta": "pdserve.engine.outputs",
    "RequestOutput": "pdserve.engine.outputs",
    "SamplingParams": "pdserve.engine.sampling_params",
    "GuidedDecoding": "pdserve.engine.sampling_params",
}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
