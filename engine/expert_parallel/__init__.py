"""Expert parallelism: one MoE model replica served by a group of ranks, each holding a share of
the routed experts (see docs/ARCHITECTURE.md, "Expert parallelism")."""
