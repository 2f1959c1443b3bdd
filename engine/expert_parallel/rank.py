"""`ExpertParallelRank`: what one rank's engine needs to join its group, and the joining itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pdserve.engine.expert_parallel.collective import StoreAddress, make_collective
from pdserve.engine.expert_parallel.config import ExpertParallelConfig
from pdserve.engine.expert_parallel.dispatch import ExpertDispatcher
from pdserve.engine.expert_parallel.placement import ExpertPlacement, base_range

# Checkpoint tensors of routed experts; a rank loads those it holds and skips the rest.
ROUTED_EXPERT_TENSORS = r"model\.(layers|mtp_block)\.\d+\.mlp\.experts\.\d+\."
# Dense and shared-expert MLPs whose gate and up hold this many elements or more are split over
# the ranks (`split_dense`): a split costs a round per pass (~0.3-4 ms on loaded CPUs, 2026-12-05
# demo numbers) and saves reading (size-1)/size of the weight, 8 MiB in fp32 at this size; the
# demo's are far below it, 21B-A3B's dense layer (63M) and shared experts (16M) far above.
SPLIT_MIN_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class ExpertParallelRank:
    """Rank `rank` of a group: its settings and the rendezvous address."""

    rank: int
    config: ExpertParallelConfig
    store: StoreAddress

    def held_experts(self, num_experts: int) -> Callable[[int], list[int]]:
        """Layer -> the experts this rank loads from the checkpoint there (its base share)."""
        share = list(base_range(self.rank, self.config.size, num_experts))
        return lambda layer: share

    def vocab_slice(self, vocab_size: int) -> range | None:
        """The vocabulary ids whose LM head and embedding rows this rank holds (a contiguous
        split, as the experts'), or None when it holds them all."""
        if self.config.size == 1 or not self.config.split_dense:
            return None
        return base_range(self.rank, self.config.size, vocab_size)


def split_mlps(model, config: ExpertParallelConfig) -> list:
    """The model's batch MLPs (`batch_mlps`) a group of `config` splits by intermediate unit."""
    if config.size == 1 or not config.split_dense:
        return []
    return [
        m
        for m in model.batch_mlps()
        if m.gate_proj.in_features * m.intermediate_size * 2 >= SPLIT_MIN_ELEMENTS
    ]


def keep_rank_slices(model, ep: ExpertParallelRank) -> None:
    """Drops what other ranks compute or look up for this one: all but the rank's slice of the
    LM head's and the embedding's vocabulary and of the split MLPs' intermediate units. After
    loading, before packing (so no whole copy is made); `join_group` then connects the slices to
    the group."""
    vocab = ep.vocab_slice(model.config.vocab_size)
    if vocab is not None:
        model.keep_vocab_slice(vocab.start, vocab.stop)
    for mlp in split_mlps(model, ep.config):
        units = base_range(ep.rank, ep.config.size, mlp.intermediate_size)
        mlp.keep_intermediate_slice(units.start, units.stop)


def join_group(model, ep: ExpertParallelRank, backend: str, device: str) -> ExpertDispatcher:
    """Connects a loaded, packed model's MoE layers (and its slices of the LM head, embedding and
    batch MLPs, `keep_rank_slices`) to the group and fills its spare slots.

    Every rank calls this at the same time (it is a rendezvous and a collective copy).
    """
    layers = model.moe_layers()
    # Every rank derives the same initial placement from the model; the group's owner later
    # sends rebalanced ones.
    placement = ExpertPlacement.initial(
        sorted(layers), model.config.moe_num_experts, ep.config.size, ep.config.num_redundant_experts
    )
    collective = make_collective(backend, ep.store, ep.rank, ep.config.size, ep.config.timeout_s, device)
    dispatcher = ExpertDispatcher(collective, placement, model.config.hidden_size)
    dispatcher.dtype = model.model.embed_tokens.weight.dtype  # the rows' compute dtype
    for layer_id, moe in layers.items():
        moe.attach(dispatcher, layer_id)
    # Every rank registers the same split products in the same order (`keep_rank_slices`).
    if ep.vocab_slice(model.config.vocab_size) is not None:
        head = dispatcher.register_columns(model.head_slice_logits, model.config.vocab_size)
        model.gather_logits = partial(dispatcher.gather_columns, head)
        dispatcher.register_table(model.model.embed_tokens, model.config.vocab_size)
        model.gather_embeddings = dispatcher.gather_rows
    for mlp in model.batch_mlps():
        if mlp.intermediate_slice is not None:
            product = dispatcher.register_columns(mlp.intermediate, mlp.intermediate_size)
            mlp.gather_intermediate = partial(dispatcher.gather_columns, product)
    install_placement(model, dispatcher, placement)
    return dispatcher


def install_placement(model, dispatcher: ExpertDispatcher, placement: ExpertPlacement) -> None:
    """Copies the spare experts `placement` asks for, then swaps the routing table to it."""
    if placement.spares_per_rank:
        layers = model.moe_layers()
        dispatcher.copy_spares(
            placement,
            lambda layer, e: layers[layer].expert_row(e),
            lambda layer, rows: layers[layer].install_spares(rows),
        )
    dispatcher.set_placement(placement)
