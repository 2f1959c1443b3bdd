"""`ExpertDispatcher`: dispatch and combine of one rank's MoE layers over the group.

Each rank runs its own sequences (attention is data parallel) and reaches its MoE layers on its
own schedule. Every exchange is one *round* that all ranks enter together: a rank inside a MoE
layer sends each rank holding some of a token's experts that token's row once, with the
(row, local slot) pairs to run there, and a rank that finished its step (`finish_step`) sends
nothing but still computes what others send it. A round's header says
which layer each sender is in, so ranks need not be in the same layer, pass or step: a rank with
no tokens, or one running an MTP or verification pass the others are not, never deadlocks them.
The step ends in the first round where every rank has finished.

The LM head is split the same way (`head_logits`): each rank holds a contiguous slice of the
vocabulary's head rows; a rank computing logits sends its normed rows to every rank in a round
tagged `HEAD`, each rank multiplies all the rows it got (every sender's at once) by its slice, and
the sender puts the slices side by side. A logit is the same dot product over the hidden size as
one engine's, so sampling sees the same logits, and the group reads the head once per step.

Experts return unweighted rows; the sender weighs them and sums a token's k slots in slot order
(the C kernel's `combine_slots`), so a token's result is the same float for float whichever
rank ran its experts, and the same as one engine's decode-sized MoE path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pdserve.engine.expert_parallel.collective import ExpertCollective
from pdserve.engine.expert_parallel.placement import ExpertPlacement, base_range
from pdserve.engine.kernels import moe_cpu

# Header columns: (token, slot) pairs sent to that rank, the sender's layer (-1: finished its
# step, HEAD: computing logits), finished, and distinct token rows sent (a token's slots on one
# rank share its row; in a HEAD round, the sender's normed rows, sent to every rank).
_SLOTS, _LAYER, _DONE, _ROWS = 0, 1, 2, 3
FINISHED, HEAD = -1, -2

# (rows [P, H], local slot ids [P]) -> unweighted expert outputs [P, H]
HeldExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# normed rows [R, H] -> logits of this rank's vocabulary slice [R, slice], fp32
HeadSliceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DispatchStats:
    """What this rank's dispatcher did, for metrics and `pdserve bench ep`."""

    rounds: int = 0
    seconds: float = 0.0  # in collectives (waiting included), not expert compute
    compute_seconds: float = 0.0  # running experts for this and other ranks' rows
    head_seconds: float = 0.0  # computing this rank's vocabulary slice of any rank's logits
    head_rounds: int = 0  # rounds this rank computed logits in
    rows_sent: int = 0
    rows_received: int = 0
    # layer -> tokens routed to each logical expert from this rank's sequences (taken and reset
    # by the group's owner)
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)
    # layer -> rows this rank's experts computed there since start, for any rank
    layer_rows: dict[int, int] = field(default_factory=dict)


class ExpertDispatcher:
    """One rank's side of the group's dispatch/combine (see the module docstring)."""

    def __init__(self, collective: ExpertCollective, placement: ExpertPlacement, hidden_size: int) -> None:
        self.collective = collective
        self.hidden_size = hidden_size
        self.rank = collective.rank
        self.size = collective.size
        self.dtype = torch.float32  # of the rows; the model sets its compute dtype
        self.stats = DispatchStats()
        self._layers: dict[int, HeldExpertsFn] = {}
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.placement = placement
        self._head: HeadSliceFn | None = None
        self._vocab_size = 0

    def register_head(self, head_slice: HeadSliceFn, vocab_size: int) -> None:
        """`head_slice` computes this rank's slice (`base_range(rank, size, vocab_size)`) of the
        logits; every rank of the group registers one before the first step."""
        self._head = head_slice
        self._vocab_size = vocab_size

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """fp32 logits [R, V] of normed rows [R, H], each rank computing its vocabulary slice."""
        r = normed.shape[0]
        if r == 0:  # nothing to ask the others for (a round is only needed by a rank with rows)
            return torch.zeros(0, self._vocab_size, dtype=torch.float32, device=normed.device)
        rows = normed.to(self.dtype).contiguous()
        sent = self._round(HEAD, [0] * self.size, rows.repeat(self.size, 1), None, [r] * self.size)
        assert sent is not None  # this rank has not finished, so the round is not the last
        slices = sent.view(self.size, r, -1)
        return torch.cat(
            [slices[k, :, : len(base_range(k, self.size, self._vocab_size))] for k in range(self.size)],
            dim=1,
        )

    def register(self, layer: int, run_held: HeldExpertsFn) -> None:
        """`run_held` computes this rank's held experts of MoE layer `layer`."""
        self._layers[layer] = run_held
        self._tables[layer] = self.placement.replica_table(layer)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Swaps the routing table (between steps, after the held copies were filled)."""
        self.placement = placement
        self._tables = {layer: placement.replica_table(layer) for layer in self._layers}

    def dispatch(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum over slots s of weights[t, s] * expert_{ids[t, s]}(x[t]), experts wherever held."""
        t, k = ids.shape
        flat = ids.reshape(-1).cpu().numpy()
        counts = self.stats.expert_tokens.setdefault(layer, [0] * self.placement.num_experts)
        for e, n in enumerate(np.bincount(flat, minlength=self.placement.num_experts)):
            counts[e] += int(n)
        ranks, slots, copies = self._tables[layer]
        token = np.arange(t * k) // k
        # Copies split an expert's tokens: token i of this rank goes to copy (i + rank) % copies.
        choice = (token + self.rank) % copies[flat]
        dest, local = ranks[flat, choice], slots[flat, choice]
        order = np.argsort(dest, kind="stable")  # by rank, then (token, slot) as routed
        dest, token = dest[order], token[order]
        # One row per (token, rank): a token's slots on one rank are adjacent here and share it.
        first = np.ones(len(order), dtype=bool)
        first[1:] = (dest[1:] != dest[:-1]) | (token[1:] != token[:-1])
        row_counts = np.bincount(dest[first], minlength=self.size)
        row_starts = np.concatenate([[0], np.cumsum(row_counts)[:-1]])
        # Per pair: the expert's local slot there, and its row's index within that rank's rows.
        pairs = np.stack([local[order], np.cumsum(first) - 1 - row_starts[dest]], axis=1)
        back = self._round(
            layer,
            np.bincount(dest, minlength=self.size).tolist(),
            x[torch.from_numpy(token[first])],
            torch.from_numpy(pairs),
            row_counts.tolist(),
        )
        per_slot = torch.empty(t * k, x.shape[1], dtype=x.dtype, device=x.device)
        per_slot[torch.from_numpy(order)] = back
        return combine(per_slot.view(t, k, -1), weights)

    def finish_step(self) -> None:
        """Serves other ranks' rows until every rank has finished its step."""
        while self._round(FINISHED, [0] * self.size, None, None, [0] * self.size) is not None:
            pass

    def _round(
        self,
        layer: int,
        send_counts: list[int],
        rows: torch.Tensor | None,
        pairs: torch.Tensor | None,
        row_counts: list[int],
    ) -> torch.Tensor | None:
        """One exchange of `send_counts[r]` (token, slot) pairs with rank r, `pairs` holding each
        one's (local slot there, index among the `row_counts[r]` rows sent there); returns one
        computed row per pair (in a HEAD round: every rank's logit slice of every row sent, padded
        to the widest slice, rank 0's first), or None when all ranks finished."""
        c = self.collective
        started = time.perf_counter()
        header = torch.tensor(
            [[n, layer, layer == FINISHED, m] for n, m in zip(send_counts, row_counts)],
            dtype=torch.int64,
            device=c.device,
        )
        # The counts size this round's other collectives, so they come to the host (on a GPU, a sync).
        got = c.all_to_all(header, [1] * self.size, [1] * self.size).cpu()
        self.stats.rounds += 1
        if bool(got[:, _DONE].all()):
            self.stats.seconds += time.perf_counter() - started
            return None
        recv_counts, recv_rows = got[:, _SLOTS].tolist(), got[:, _ROWS].tolist()
        if rows is None:
            rows = torch.empty(0, self.hidden_size, dtype=self.dtype, device=c.device)
        if pairs is None:
            pairs = torch.empty(0, 2, dtype=torch.int64)
        got_rows = c.all_to_all(rows.to(c.device), row_counts, recv_rows)
        in_pairs = c.all_to_all(pairs.to(c.device), send_counts, recv_counts)
        computed = time.perf_counter()
        out = self._run_experts(got, got_rows, in_pairs)
        experts = time.perf_counter() - computed
        back = c.all_to_all(out, recv_counts, send_counts)
        head = 0.0
        head_senders = [s for s in range(self.size) if int(got[s, _LAYER]) == HEAD]
        if head_senders:  # every rank sees every sender's layer, so all take this branch together
            computed = time.perf_counter()
            slices = self._run_head(got_rows, recv_rows, head_senders)
            head = time.perf_counter() - computed
            self.stats.head_rounds += layer == HEAD
            logits = c.all_to_all(
                slices,
                [recv_rows[s] if s in head_senders else 0 for s in range(self.size)],
                [row_counts[0] if layer == HEAD else 0] * self.size,
            )
            if layer == HEAD:  # a rank in a MoE layer keeps its experts' rows
                back = logits
        self.stats.seconds += time.perf_counter() - started - experts - head
        self.stats.compute_seconds += experts
        self.stats.head_seconds += head
        # Token rows moved for experts; a HEAD round's rows are counted by `head_rounds`.
        if layer != HEAD:
            self.stats.rows_sent += sum(n for r, n in enumerate(row_counts) if r != self.rank)
        self.stats.rows_received += sum(
            n for r, n in enumerate(recv_rows) if r != self.rank and r not in head_senders
        )
        return back

    def _run_experts(self, got: torch.Tensor, got_rows: torch.Tensor, in_pairs: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the (row, local slot) pairs other ranks sent, by sender layer."""
        c = self.collective
        recv_counts, recv_rows = got[:, _SLOTS].tolist(), got[:, _ROWS].tolist()
        # Each pair's row: the sender's block of rows, then the pair's index within it.
        row_starts = torch.tensor(np.concatenate([[0], np.cumsum(recv_rows)[:-1]]), device=c.device)
        sender = torch.repeat_interleave(
            torch.arange(self.size, device=c.device), torch.tensor(recv_counts, device=c.device)
        )
        in_rows = got_rows[row_starts[sender] + in_pairs[:, 1]]
        in_local = in_pairs[:, 0]
        out = torch.empty_like(in_rows)
        starts = np.concatenate([[0], np.cumsum(recv_counts)])
        for src_layer in sorted({int(v) for v, n in zip(got[:, _LAYER].tolist(), recv_counts) if n}):
            pick = np.concatenate(
                [
                    np.arange(starts[s], starts[s + 1])
                    for s in range(self.size)
                    if int(got[s, _LAYER]) == src_layer
                ]
            )
            index = torch.from_numpy(pick).to(in_rows.device)
            self.stats.layer_rows[src_layer] = self.stats.layer_rows.get(src_layer, 0) + len(pick)
            out[index] = self._layers[src_layer](in_rows[index], in_local[index])
        return out

    def _run_head(self, got_rows: torch.Tensor, recv_rows: list[int], senders: list[int]) -> torch.Tensor:
        """This rank's logit slice of every row the `senders` (in a HEAD round) sent, in one
        product, padded to the widest rank's slice: [their rows, ceil(V / size)]."""
        if self._head is None:
            raise RuntimeError("a rank asked for logits but this rank has no LM head slice registered")
        starts = np.concatenate([[0], np.cumsum(recv_rows)])
        rows = torch.cat([got_rows[starts[s] : starts[s + 1]] for s in senders])
        logits = self._head(rows)
        width = -(-self._vocab_size // self.size)
        if logits.shape[1] < width:
            logits = torch.nn.functional.pad(logits, (0, width - logits.shape[1]))
        return logits.contiguous()

    def copy_spares(
        self,
        placement: ExpertPlacement,
        base_weights: Callable[[int, int], torch.Tensor],
        install: Callable[[int, list[torch.Tensor]], None],
    ) -> None:
        """Fills every rank's spare slots for `placement` from the experts' owners, all ranks at once.

        `base_weights(layer, e)` is this rank's own expert e flattened into one row; `install(layer,
        rows)` receives this rank's new spares' rows, in slot order. Run between steps, then
        `set_placement(placement)`: the weights are in place before any token is routed to them.
        """
        c = self.collective
        for layer in sorted(self._layers):
            spares = placement.spares[layer]
            owner = {e: r for r in range(self.size) for e in base_range(r, self.size, placement.num_experts)}
            sends = [[e for e in spares[r] if owner[e] == self.rank] for r in range(self.size)]
            recvs = [[e for e in spares[self.rank] if owner[e] == r] for r in range(self.size)]
            rows = [base_weights(layer, e) for dest in sends for e in dest]
            width = base_weights(
                layer, next(iter(base_range(self.rank, self.size, placement.num_experts)))
            ).numel()
            send = torch.stack(rows) if rows else torch.empty(0, width, dtype=torch.float32)
            got = c.all_to_all(send.to(c.device), [len(s) for s in sends], [len(r) for r in recvs])
            by_expert = dict(zip([e for src in recvs for e in src], got))
            install(layer, [by_expert[e] for e in spares[self.rank]])


def combine(per_slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over s of weights[t, s] * per_slot[t, s], in slot order (as the MoE kernel sums)."""
    weighted = per_slot * weights.to(per_slot.dtype).unsqueeze(-1)
    t, k, h = weighted.shape
    if moe_cpu.available() and weighted.device.type == "cpu" and weighted.dtype == torch.float32:
        out = torch.empty(t, h, dtype=torch.float32)
        moe_cpu.combine_slots(weighted.contiguous(), out)
        return out
    out = weighted[:, 0].clone()
    for s in range(1, k):
        out += weighted[:, s]
    return out
