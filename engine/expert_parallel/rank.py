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


def join_group(model, ep: ExpertParallelRank, backend: str, device: str) -> ExpertDispatcher:
    """Connects a loaded, packed model's MoE layers to the group and fills its spare slots.

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
