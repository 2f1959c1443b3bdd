"""`MTPProposer`: the checkpoint's own multi-token-prediction layer guesses the next k tokens.

ERNIE's MTP layer reads the main model's pre-norm hidden state at position t and the token at
t+1, and predicts t+2. Its KV cache is one more layer of the engine's paged pool, so it shares
the requests' blocks, the prefix cache and KV transfer. The runner keeps that layer's cache up
with every forward pass; what is left to the proposer is the sequence's last computed position,
whose next token (the one just sampled) was unknown during the pass. From there it chains: each
guess's MTP output stands in for the hidden state of the next position (one layer serving
k > 1, as vLLM and SGLang do); those chained cache entries are overwritten by the next pass.
"""

from __future__ import annotations

import torch

from pdserve.engine.request import Request


class MTPProposer:
    """Greedy guesses from the target's MTP layer (index `mtp_layer` of its KV cache)."""

    def __init__(self, engine, mtp_layer: int) -> None:  # engine: pdserve.engine.Engine
        self.engine = engine
        self.mtp_layer = mtp_layer

    @torch.inference_mode()
    def propose(self, requests: list[Request], ks: list[int]) -> None:
        e = self.engine
        live: list[Request] = []
        wanted: list[int] = []
        for req, k in zip(requests, ks):
            req.spec_token_ids = []
            # Without the last position's hidden state (a preemption, or a KV import that did not
            # carry it) there is nothing to chain from; the request decodes plainly this step.
            if req.mtp_hidden is not None and e.kv.allocate(req, req.num_computed_tokens + k - 1):
                live.append(req)
                wanted.append(k)
        if not live:
            return
        hidden = torch.stack([r.mtp_hidden for r in live])
        next_ids = [r.all_token_ids[-1] for r in live]
        positions = [r.num_computed_tokens - 1 for r in live]
        kv_layer = e.kv_cache.layer(self.mtp_layer)
        while live:
            meta = e.runner.single_token_meta([r.block_ids for r in live], positions)
            pos = torch.tensor(positions, dtype=torch.long, device=e.device)
            ids = torch.tensor(next_ids, dtype=torch.long, device=e.device)
            hidden = e.model.mtp_forward(hidden, ids, pos, kv_layer, meta)
            tokens = e.model.compute_logits(hidden).argmax(dim=-1).tolist()
            keep = []
            for i, (req, token, k) in enumerate(zip(live, tokens, wanted)):
                req.spec_token_ids.append(token)
                if len(req.spec_token_ids) < k:
                    keep.append(i)
            live = [live[i] for i in keep]
            wanted = [wanted[i] for i in keep]
            hidden = hidden[keep]
            next_ids = [tokens[i] for i in keep]
            positions = [positions[i] + 1 for i in keep]

    def forget(self, request_id: str) -> None:
        """The MTP cache lives in the request's own blocks; nothing else is kept."""
