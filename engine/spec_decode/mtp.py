"""`MTPProposer`: the checkpoint's own multi-token-prediction layer guesses the next k tokens.

ERNIE's MTP layer reads the main model's pre-norm hidden state at position t and the token at
t+1, and predicts t+2. Its KV cache is one more layer of the engine's paged pool, so it shares
the requests' blocks, the prefix cache and KV transfer. Prompt positions are fed to it in the
main pass that computes them. Decoded positions are fed here: the engine keeps the hidden states
of the positions accepted last step, and the first MTP pass writes their entries (their next
tokens are known now) and guesses from the last one. From there it chains: each guess's MTP
output stands in for the hidden state of the next position (one layer serving k > 1, as vLLM
and SGLang do); those chained entries are overwritten by the next catch-up.
"""

from __future__ import annotations

import torch

from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import Request


class MTPProposer:
    """Greedy guesses from the target's MTP layer, through the target's own runner (whose
    `mtp_layer` is the MTP layer's index in the KV cache) and block manager."""

    def __init__(self, runner: ModelRunner, kv: KVCacheManager) -> None:
        if runner.mtp_layer is None:
            raise ValueError("MTPProposer needs a runner that keeps the MTP layer's cache (mtp_layer)")
        self.runner = runner
        self.kv = kv
        self.mtp_layer = runner.mtp_layer

    @torch.inference_mode()
    def propose(self, requests: list[Request], ks: list[int]) -> None:
        runner = self.runner
        live: list[Request] = []
        wanted: list[int] = []
        for req, k in zip(requests, ks):
            req.spec_token_ids = []
            # Without pending hidden states (after a preemption, or a KV import that did not carry
            # them) there is nothing to guess from; the request decodes plainly this step.
            if req.mtp_hidden is not None and self.kv.allocate(req, req.num_computed_tokens + k - 1):
                live.append(req)
                wanted.append(k)
        if not live:
            return
        kv_layer = runner.kv_cache.layer(self.mtp_layer)
        # Catch-up: each request's pending positions q0..q (q = num_computed_tokens - 1), fed the
        # tokens that followed them; the last row's output guesses the token after the newest.
        counts = [len(r.mtp_hidden) for r in live]  # type: ignore[arg-type]
        starts = [r.num_computed_tokens - n for r, n in zip(live, counts)]
        hidden = torch.cat([r.mtp_hidden for r in live])  # type: ignore[misc]
        next_ids = [t for r, s, n in zip(live, starts, counts) for t in r.all_token_ids[s + 1 : s + n + 1]]
        positions = [p for s, n in zip(starts, counts) for p in range(s, s + n)]
        meta = runner.spans_meta([r.block_ids for r in live], starts, counts)
        out = self._forward(hidden, next_ids, positions, kv_layer, meta)
        last_rows = torch.tensor([sum(counts[: i + 1]) - 1 for i in range(len(live))], device=runner.device)
        hidden = out[last_rows]
        positions = [r.num_computed_tokens for r in live]  # where each chained guess sits
        for req in live:
            req.mtp_hidden = None  # written now
        while True:
            tokens = runner.model.compute_logits(hidden).argmax(dim=-1).tolist()
            keep = []
            for i, (req, token, k) in enumerate(zip(live, tokens, wanted)):
                req.spec_token_ids.append(token)
                if len(req.spec_token_ids) < k:
                    keep.append(i)
            if not keep:
                return
            live = [live[i] for i in keep]
            wanted = [wanted[i] for i in keep]
            next_ids = [tokens[i] for i in keep]
            positions = [positions[i] for i in keep]
            meta = runner.spans_meta([r.block_ids for r in live], positions, [1] * len(live))
            hidden = self._forward(hidden[keep], next_ids, positions, kv_layer, meta)
            positions = [p + 1 for p in positions]

    def _forward(self, hidden: torch.Tensor, next_ids: list[int], positions: list[int], kv_layer, meta):
        device = self.runner.device
        ids = torch.tensor(next_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        return self.runner.model.mtp_forward(hidden, ids, pos, kv_layer, meta)

    def forget(self, request_id: str) -> None:
        """The MTP cache lives in the request's own blocks; nothing else is kept."""
