"""`ExpertParallelRank`: what one rank's engine needs to join its group, and the joining itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.expert_parallel.collective import StoreAddress, make_collective
from pdserve.engine.expert_parallel.config import ExpertParallelConfig
from pdserve.engine.expert_parallel.dispatch import ExpertDispatcher
from pdserve.engine.expert_parallel.placement import ExpertPlacement, base_range

# Checkpoint tensors of routed experts; a rank loads those it holds and skips the rest.
ROUTED_EXPERT_TENSORS = r"model\.(layers|mtp_block)\.\d+\.mlp\.experts\.\d+\."


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
        """The vocabulary ids whose LM head rows this rank holds (a contiguous split, as the
        experts'), or None when it holds them all."""
        if self.config.size == 1 or not self.config.split_lm_head:
            return None
        return base_range(self.rank, self.config.size, vocab_size)


def join_group(model, ep: ExpertParallelRank, backend: str, device: str) -> ExpertDispatcher:
    """Connects a loaded, packed model's MoE layers (and its LM head slice, see
    `ExpertParallelRank.vocab_slice`) to the group and fills its spare slots.

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
    if ep.vocab_slice(model.config.vocab_size) is not None:  # the model kept only its slice
        dispatcher.register_head(model.head_slice_logits, model.config.vocab_size)
        model.gather_logits = dispatcher.head_logits
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
