"""`ExpertDispatcher`: dispatch and combine of one rank's MoE layers over the group.

Each rank runs its own sequences (attention is data parallel) and reaches its MoE layers on its
own schedule. Every exchange is one *round* that all ranks enter together: a rank inside a MoE
layer sends each rank holding some of a token's experts that token's row once, with the
(row, local slot) pairs to run there, and a rank that finished its step (`finish_step`) sends
nothing but still computes what others send it. A round's header says
which layer each sender is in, so ranks need not be in the same layer, pass or step: a rank with
no tokens, or one running an MTP or verification pass the others are not, never deadlocks them.
The step ends in the first round where every rank has finished.

Products every token runs and whose weights would otherwise be read by every rank (the LM head,
large dense and shared-expert MLPs' gate/up) are split the same way (`gather_columns`): each rank
holds a contiguous slice of the product's output columns; a rank sends its input rows to every
rank in a round tagged with the product (`split_tag`), each rank computes its columns for all the
rows it got (every sender's at once), and the sender puts the slices side by side. An output is
the same dot product as one engine's, so results stay those of one engine, and the group reads
such a weight once per step instead of once per rank.

Tables every token reads (the embedding) are split by row (`gather_rows`): each rank holds a
contiguous slice of the rows, and a rank sends each token's id to the rank holding its row in a
`LOOKUP` round (no hidden rows travel out, one row per id comes back), as a MoE round sends a token
to its experts' ranks. A lookup is a copy, so the rows are one engine's bit for bit.

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

# Header columns: (token, slot) pairs sent to that rank, the sender's layer (FINISHED: finished
# its step; LOOKUP: reading the split table, one pair per id; `split_tag(p)`: in split product p),
# finished, and distinct token rows sent (a token's slots on one rank share its row; in a split
# product's round, all the sender's rows, to every rank; in a lookup, none).
_SLOTS, _LAYER, _DONE, _ROWS = 0, 1, 2, 3
FINISHED = -1
LOOKUP = -2
_GOLDEN = (5**0.5 - 1) / 2  # the fractional part of the golden ratio


def split_tag(product: int) -> int:
    """The header layer of a round in split product `product` (MoE layers are >= 0)."""
    return -3 - product


def is_split(tag: int) -> bool:
    """Whether a header layer is a split product's (`split_tag`)."""
    return tag <= split_tag(0)


# (rows [P, H], local slot ids [P]) -> unweighted expert outputs [P, H]
HeldExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# input rows [R, H] -> this rank's slice of the product's output columns [R, slice]
ColumnSliceFn = Callable[[torch.Tensor], torch.Tensor]
# ids [N] within this rank's slice of a split table -> its rows there [N, H]
RowSliceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DispatchStats:
    """What this rank's dispatcher did, for metrics and `pdserve bench ep`."""

    rounds: int = 0
    seconds: float = 0.0  # in collectives (waiting included), not expert compute
    compute_seconds: float = 0.0  # running experts (and table lookups) for this and other ranks' rows
    split_seconds: float = 0.0  # computing this rank's columns of split products for any rank
    split_rounds: int = 0  # rounds in which this rank gathered a split product's columns
    lookup_rounds: int = 0  # rounds in which this rank gathered rows of the split table
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
        self._cumulative: dict[int, np.ndarray] = {}  # layer -> `cumulative_shares`
        self._seen: dict[int, np.ndarray] = {}  # layer -> slots this rank routed to each expert
        self.placement = placement
        self._products: list[tuple[ColumnSliceFn, int]] = []
        self._table: tuple[RowSliceFn, int] | None = None

    def register_columns(self, column_slice: ColumnSliceFn, width: int) -> int:
        """Registers a split product of `width` output columns, this rank computing columns
        `base_range(rank, size, width)` with `column_slice`; returns its id for `gather_columns`.
        Every rank registers the same products in the same order before the first step."""
        self._products.append((column_slice, width))
        return len(self._products) - 1

    def gather_columns(self, product: int, rows: torch.Tensor) -> torch.Tensor:
        """All `width` output columns of split product `product` for input rows [R, H], each
        rank computing its slice; in fp32 (products of one round travel together, and the LM
        head's logits are fp32 whatever the model's dtype)."""
        r, width = rows.shape[0], self._products[product][1]
        if r == 0:  # nothing to ask the others for (a round is only needed by a rank with rows)
            return torch.zeros(0, width, dtype=torch.float32, device=rows.device)
        rows = rows.to(self.dtype).contiguous()
        sent = self._round(
            split_tag(product), [0] * self.size, rows.repeat(self.size, 1), None, [r] * self.size
        )
        assert sent is not None  # this rank has not finished, so the round is not the last
        slices = sent.view(self.size, r, -1)
        return torch.cat(
            [slices[k, :, : len(base_range(k, self.size, width))] for k in range(self.size)], dim=1
        )

    def register_table(self, row_slice: RowSliceFn, num_rows: int) -> None:
        """Registers the split table of `num_rows` rows (the embedding), this rank holding rows
        `base_range(rank, size, num_rows)` and reading them with `row_slice` (ids within the slice)."""
        self._table = (row_slice, num_rows)

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The split table's rows for `ids` (any shape; rows [*ids.shape, H]), each fetched from
        the rank holding it in one `LOOKUP` round: exact copies, in this rank's compute dtype."""
        assert self._table is not None, "gather_rows needs register_table first"
        num_rows = self._table[1]
        flat = ids.reshape(-1).cpu().numpy()
        if len(flat) == 0:  # no round: the others need none from a rank that asks for nothing
            return torch.zeros(*ids.shape, self.hidden_size, dtype=self.dtype, device=ids.device)
        if flat.min() < 0 or flat.max() >= num_rows:
            raise ValueError(
                f"token ids must lie in [0, {num_rows}) (the vocabulary), got {flat.min()}..{flat.max()}"
            )
        starts = np.array([base_range(r, self.size, num_rows).start for r in range(self.size)])
        owner = np.searchsorted(starts, flat, side="right") - 1
        order = np.argsort(owner, kind="stable")  # by owning rank, then as asked
        local = flat[order] - starts[owner[order]]
        pairs = torch.from_numpy(np.stack([local, np.zeros_like(local)], axis=1).astype(np.int64))
        back = self._round(
            LOOKUP, np.bincount(owner, minlength=self.size).tolist(), None, pairs, [0] * self.size
        )
        assert back is not None  # this rank has not finished, so the round is not the last
        out = torch.empty(len(flat), self.hidden_size, dtype=back.dtype, device=back.device)
        out[torch.from_numpy(order).to(back.device)] = back
        return out.view(*ids.shape, self.hidden_size).to(ids.device)

    def register(self, layer: int, run_held: HeldExpertsFn) -> None:
        """`run_held` computes this rank's held experts of MoE layer `layer`."""
        self._layers[layer] = run_held
        self._tables[layer] = self.placement.replica_table(layer)
        self._cumulative[layer] = cumulative_shares(self.placement, layer)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Swaps the routing table (between steps, after the held copies were filled)."""
        self.placement = placement
        self._tables = {layer: placement.replica_table(layer) for layer in self._layers}
        self._cumulative = {layer: cumulative_shares(placement, layer) for layer in self._layers}

    def dispatch(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum over slots s of weights[t, s] * expert_{ids[t, s]}(x[t]), experts wherever held."""
        t, k = ids.shape
        flat = ids.reshape(-1).cpu().numpy()
        counts = self.stats.expert_tokens.setdefault(layer, [0] * self.placement.num_experts)
        for e, n in enumerate(np.bincount(flat, minlength=self.placement.num_experts)):
            counts[e] += int(n)
        ranks, slots, _ = self._tables[layer]
        token = np.arange(t * k) // k
        cumulative = self._cumulative[layer]
        seen = self._seen.setdefault(layer, np.zeros(len(cumulative), dtype=np.int64))
        choice = choose_copies(cumulative, seen, flat, self.rank / self.size)
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
        one's (local slot there, index among the `row_counts[r]` rows sent there; in a lookup:
        (row id within rank r's slice, 0)); returns one computed row per pair (in a split product's
        round: every rank's columns of the rows sent, padded to the widest slice in the round, rank
        0's first), or None when all ranks finished."""
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
        split = 0.0
        # Senders in a split product, and which; every rank sees every sender's layer, so all
        # ranks take this branch together.
        products = {
            s: split_tag(0) - int(got[s, _LAYER]) for s in range(self.size) if is_split(int(got[s, _LAYER]))
        }
        if products:
            computed = time.perf_counter()
            slices = self._run_columns(got_rows, recv_rows, products)
            split = time.perf_counter() - computed
            self.stats.split_rounds += is_split(layer)
            columns = c.all_to_all(
                slices,
                [recv_rows[s] if s in products else 0 for s in range(self.size)],
                [row_counts[0] if is_split(layer) else 0] * self.size,
            )
            if is_split(layer):  # a rank in a MoE layer or lookup keeps its pairs' rows
                back = columns
        self.stats.seconds += time.perf_counter() - started - experts - split
        self.stats.compute_seconds += experts
        self.stats.split_seconds += split
        self.stats.lookup_rounds += layer == LOOKUP
        # Token rows moved for experts; split products' rows are counted by `split_rounds`.
        if not is_split(layer):
            self.stats.rows_sent += sum(n for r, n in enumerate(row_counts) if r != self.rank)
        self.stats.rows_received += sum(
            n for r, n in enumerate(recv_rows) if r != self.rank and r not in products
        )
        return back

    def _run_experts(self, got: torch.Tensor, got_rows: torch.Tensor, in_pairs: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the (row, local slot) pairs other ranks sent, by sender layer,
        and its table rows for the ids senders in a lookup sent."""
        c = self.collective
        recv_counts, recv_rows = got[:, _SLOTS].tolist(), got[:, _ROWS].tolist()
        # Each pair's row: the sender's block of rows, then the pair's index within it.
        row_starts = torch.tensor(np.concatenate([[0], np.cumsum(recv_rows)[:-1]]), device=c.device)
        sender = torch.repeat_interleave(
            torch.arange(self.size, device=c.device), torch.tensor(recv_counts, device=c.device)
        )
        in_local = in_pairs[:, 0]
        out = torch.empty(len(in_pairs), self.hidden_size, dtype=self.dtype, device=c.device)
        starts = np.concatenate([[0], np.cumsum(recv_counts)])
        for src_layer in sorted({int(v) for v, n in zip(got[:, _LAYER].tolist(), recv_counts) if n}):
            pick = np.concatenate(
                [
                    np.arange(starts[s], starts[s + 1])
                    for s in range(self.size)
                    if int(got[s, _LAYER]) == src_layer
                ]
            )
            index = torch.from_numpy(pick).to(c.device)
            if src_layer == LOOKUP:
                assert self._table is not None, "a rank asked for table rows this rank did not register"
                out[index] = self._table[0](in_local[index]).to(self.dtype)
                continue
            rows = got_rows[row_starts[sender[index]] + in_pairs[index, 1]]
            self.stats.layer_rows[src_layer] = self.stats.layer_rows.get(src_layer, 0) + len(pick)
            out[index] = self._layers[src_layer](rows, in_local[index])
        return out

    def _run_columns(
        self, got_rows: torch.Tensor, recv_rows: list[int], products: dict[int, int]
    ) -> torch.Tensor:
        """This rank's columns of every row the senders in `products` (sender -> product) sent,
        one product call per product over all its senders' rows, in sender order and padded to
        the widest slice of any product in the round: [their rows, widest]."""
        if any(p >= len(self._products) for p in products.values()):
            raise RuntimeError(
                f"a rank asked for split products {sorted(set(products.values()))} but this rank registered {len(self._products)}"
            )
        starts = np.concatenate([[0], np.cumsum(recv_rows)])
        width = max(-(-self._products[p][1] // self.size) for p in products.values())
        block: dict[int, torch.Tensor] = {}
        for product in sorted(set(products.values())):
            senders = [s for s in sorted(products) if products[s] == product]
            out = self._products[product][0](
                torch.cat([got_rows[starts[s] : starts[s + 1]] for s in senders])
            )
            out = torch.nn.functional.pad(out.float(), (0, width - out.shape[1]))
            for s, part in zip(senders, out.split([recv_rows[s] for s in senders])):
                block[s] = part
        return torch.cat([block[s] for s in sorted(block)]).contiguous()

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


def choose_copies(cumulative: np.ndarray, seen: np.ndarray, flat: np.ndarray, offset: float) -> np.ndarray:
    """Which copy of its expert each routed slot (`flat`: logical experts) goes to, so that each
    copy takes its share of the expert's slots (`cumulative`: `cumulative_shares`). The n-th slot
    a rank routes to expert e (`seen[e]` before this call, counted up here) picks by where
    frac(n * golden ratio + offset) falls in e's cumulative shares: that sequence fills [0, 1)
    evenly for any n, so shares hold in every window. Outputs do not depend on the choice."""
    by_expert = np.argsort(flat, kind="stable")
    per_expert = np.bincount(flat, minlength=len(cumulative))
    nth = np.empty(len(flat), dtype=np.int64)  # index among this call's slots for its expert
    nth[by_expert] = np.arange(len(flat)) - (np.cumsum(per_expert) - per_expert)[flat[by_expert]]
    u = np.modf((seen[flat] + nth) * _GOLDEN + offset)[0]
    seen += per_expert
    return (cumulative[flat] <= u[:, None]).sum(axis=1)


def cumulative_shares(placement: ExpertPlacement, layer: int) -> np.ndarray:
    """[E, C]: where each copy's share of its expert's slots ends in [0, 1); the last copy's end
    (and the unused columns after it) is 2, above any draw, so rounding never picks past it."""
    shares = placement.copy_shares(layer)
    cumulative = np.cumsum(shares, axis=1)
    _, _, copies = placement.replica_table(layer)
    for e, n in enumerate(copies):
        cumulative[e, n - 1 :] = 2.0
    return cumulative


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
