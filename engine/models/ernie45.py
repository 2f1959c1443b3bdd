"""ERNIE 4.5 text models, dense (`Ernie4_5ForCausalLM`) and MoE (`Ernie4_5_MoeForCausalLM`).

Module and parameter names are the hub checkpoint's tensor names, so loading is a name-for-name
copy. The forward pass works on a flattened batch of tokens from many sequences at once, with
K/V in a paged cache (see `layers/attention.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdserve.engine.config import ModelConfig
from pdserve.engine.layers.attention import AttentionMetadata, paged_attention
from pdserve.engine.layers.linear import (
    CpuGemm,
    FusedInputMajor,
    FusedRowMajor,
    Linear,
    PrepackedWeight,
    fuse_linears,
    linear,
    pack_input_major,
    prepack_if_large,
)
from pdserve.engine.layers.mlp import GatedMLP
from pdserve.engine.layers.moe import SparseMoE
from pdserve.engine.layers.norm import RMSNorm
from pdserve.engine.layers.rotary import RotaryEmbedding

# layer index -> the routed experts an instance holds there; None: all of them
HeldExpertsOf = Callable[[int], list[int]] | None


class Attention(nn.Module):
    """Grouped-query self-attention with interleaved RoPE."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        h, d, bias = config.hidden_size, config.head_dim, config.use_bias
        self.q_proj = Linear(h, self.num_heads * d, bias=bias, dtype=dtype)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=bias, dtype=dtype)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=bias, dtype=dtype)
        self.o_proj = Linear(self.num_heads * d, h, bias=bias, dtype=dtype)
        self._qkv: FusedInputMajor | FusedRowMajor | None = None

    def fuse(self, gemm: CpuGemm, prepack: bool = False) -> None:
        """Computes q, k and v with one matmul (see `fuse_linears`); call after `pack_for_cpu`."""
        self._qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj], gemm, prepack)
        if prepack:
            self.o_proj.prepack()

    def forward(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        if self._qkv is not None:
            q, k, v = self._qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q = RotaryEmbedding.rotate(q, rotation)
        k = RotaryEmbedding.rotate(k, rotation)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block; the MLP is routed experts on MoE layers."""

    def __init__(
        self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, held_experts: HeldExpertsOf = None
    ) -> None:
        super().__init__()
        self.self_attn = Attention(config, dtype)
        self.mlp: nn.Module = (
            SparseMoE(config, dtype, held_experts(layer_idx) if held_experts is not None else None)
            if config.is_moe_layer(layer_idx)
            else GatedMLP(config.hidden_size, config.intermediate_size, config.use_bias, dtype)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotation, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Ernie45Model(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, decoder layers, final norm, MTP layers."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, held_experts: HeldExpertsOf = None) -> None:
        super().__init__()
        h = config.hidden_size
        # Given its weight, nn.Embedding skips its random init, whose first use on the meta device
        # imports torch._refs (1.3 s and ~90 MB per worker) for a tensor the loader overwrites.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, h, _weight=torch.empty(config.vocab_size, h, dtype=dtype), _freeze=True
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, held_experts) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(h, config.rms_norm_eps, dtype)
        # ERNIE's multi-token-prediction head, loaded for speculative decoding (not run by forward).
        n_mtp = config.num_nextn_predict_layers
        self.mtp_emb_norm = nn.ModuleList(RMSNorm(h, config.rms_norm_eps, dtype) for _ in range(n_mtp))
        self.mtp_hidden_norm = nn.ModuleList(RMSNorm(h, config.rms_norm_eps, dtype) for _ in range(n_mtp))
        self.mtp_linear_proj = nn.ModuleList(
            Linear(2 * h, h, bias=config.use_bias, dtype=dtype) for _ in range(n_mtp)
        )
        self.mtp_block = nn.ModuleList(
            DecoderLayer(config, config.num_hidden_layers + i, dtype, held_experts) for i in range(n_mtp)
        )


class Ernie45ForCausalLM(nn.Module):
    """Dense or MoE ERNIE 4.5 language model over a paged KV cache.

    `held_experts(layer)`: which routed experts of that MoE layer this instance holds (an
    expert-parallel rank's share); default all.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, held_experts: HeldExpertsOf = None) -> None:
        super().__init__()
        self.config = config
        self.model = Ernie45Model(config, dtype, held_experts)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        )
        for p in self.parameters():
            p.requires_grad_(False)
        # With tied embeddings the LM head is the embedding matrix; lookups want it row-major,
        # the CPU matmul wants it input-major, so `pack_for_cpu` keeps a second copy.
        self._tied_head_input_major: torch.Tensor | None = None
        self._gemm: CpuGemm | None = None
        self._head_packed: PrepackedWeight | None = None
        # An expert-parallel rank's slice of the head and embedding (`keep_vocab_slice`), how its
        # `compute_logits` gathers the whole vocabulary's logits from the group (`gather_logits`)
        # and how `embed` gathers rows of other ranks' slices (`gather_embeddings`).
        self._vocab_slice: tuple[int, int] | None = None
        self.gather_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.gather_embeddings: Callable[[torch.Tensor], torch.Tensor] | None = None

    def pack_for_cpu(self, gemm: CpuGemm) -> None:
        """Stores matmul weights input-major for the CPU's fast path; call once weights are loaded.

        Routed experts keep the checkpoint's row-major weights, which their kernel reads
        (`SparseMoE.pack_for_cpu`). With MKL (`gemm.backend == "torch"`) the large weights of
        whatever sees a whole batch (attention, dense and shared-expert MLPs, the LM head) also
        get oneDNN-prepacked copies. Routed experts do not: they see a few rows each, and a copy
        of every expert would double an MoE model's memory. Not measured on OpenBLAS's CPUs, so
        not done there.
        """
        routed = [e for m in self.modules() if isinstance(m, SparseMoE) for e in m.experts]
        routed_ids = {id(e) for e in routed}
        row_major = {id(layer) for e in routed for layer in e.modules() if isinstance(layer, Linear)}
        for module in self.modules():
            if isinstance(module, Linear) and id(module) not in row_major:
                module.pack_for_cpu(gemm)
        prepack = gemm.backend == "torch"
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse(gemm, prepack)
            elif isinstance(module, SparseMoE):
                module.pack_for_cpu(gemm)
            elif isinstance(module, GatedMLP) and id(module) not in routed_ids:
                module.fuse(gemm, prepack)
        self._gemm = gemm
        embed = self.model.embed_tokens.weight
        if self.lm_head is None and embed.device.type == "cpu" and embed.dtype == torch.float32:
            self._tied_head_input_major = pack_input_major(embed)
        if prepack and (self.lm_head is None or self.lm_head.quant_format is None):
            self._head_packed = prepack_if_large(embed if self.lm_head is None else self.lm_head.weight)

    def keep_vocab_slice(self, start: int, end: int) -> None:
        """Keeps only the embedding's and the LM head's rows for vocabulary ids [start, end) (an
        expert-parallel rank's slice; a tied head is that same slice of the embedding); call after
        loading, before `pack_for_cpu`, so no whole copy is ever made. `head_slice_logits` computes
        the slice's logits and `model.embed_tokens` looks up its rows by id - start; `compute_logits`
        needs `gather_logits` and `embed` needs `gather_embeddings` for the whole vocabulary."""
        if self.lm_head is not None and self.lm_head.quant_format is not None:
            raise ValueError("a quantized LM head cannot be split over expert-parallel ranks")
        if self.lm_head is not None:
            self.lm_head.weight.data = self.lm_head.weight.data[start:end].clone()
            self.lm_head.out_features = end - start
        embed = self.model.embed_tokens
        embed.weight.data = embed.weight.data[start:end].clone()
        embed.num_embeddings = end - start
        self._vocab_slice = (start, end)

    def batch_mlps(self) -> list[GatedMLP]:
        """The MLPs every token runs (dense layers', shared experts'), in layer order."""
        layers = [*self.model.layers, *self.model.mtp_block]
        mlps = [
            layer.mlp.shared_experts if isinstance(layer.mlp, SparseMoE) else layer.mlp for layer in layers
        ]
        return [m for m in mlps if isinstance(m, GatedMLP)]

    def moe_layers(self) -> dict[int, SparseMoE]:
        """MoE layers by decoder-layer index (MTP layers numbered after the main ones)."""
        layers = [*self.model.layers, *self.model.mtp_block]
        return {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, SparseMoE)}

    @property
    def num_kv_layers(self) -> int:
        """Layers that need a KV cache in the main forward pass."""
        return self.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, H] before the final norm (what MTP reads) for the step's flattened tokens."""
        x = self.embed(input_ids)
        rotation = self.rotary.rotation(positions)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, rotation, kv_cache, meta)
        return x

    def mtp_forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The MTP layer's pre-norm output [T, H]; its logits (`compute_logits`) guess token t+2.

        Row i combines the pre-norm hidden state at position t = positions[i] with the embedding
        of token t+1, as ERNIE trains it; the layer attends over its own KV cache, by position.
        Feeding an output row back in as `hidden` guesses one more token further on.
        """
        m = self.model
        emb = self.embed(next_ids)
        x = m.mtp_linear_proj[0](torch.cat([m.mtp_emb_norm[0](emb), m.mtp_hidden_norm[0](hidden)], dim=-1))
        return m.mtp_block[0](x, self.rotary.rotation(positions), kv_cache, meta)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of token ids (the main pass's and the MTP layer's input)."""
        if self._vocab_slice is not None:
            assert self.gather_embeddings is not None, "a vocab slice needs its group's gather_embeddings"
            return self.gather_embeddings(ids)
        return self.model.embed_tokens(ids)

    @property
    def has_mtp(self) -> bool:
        return self.config.num_nextn_predict_layers > 0

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, V] for the given rows of pre-norm hidden states."""
        if self._vocab_slice is not None:
            assert self.gather_logits is not None, "a vocab slice needs its group's gather_logits"
            return self.gather_logits(self.model.norm(hidden))
        return self.head_slice_logits(self.model.norm(hidden))

    def head_slice_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """fp32 logits of normed rows for the vocabulary this instance holds (all, or its slice)."""
        if self.lm_head is not None and self.lm_head.quant_format is not None:
            return self.lm_head(normed).float()
        if self.lm_head is not None:
            weight = self.lm_head.weight
        elif self._tied_head_input_major is not None:
            weight = self._tied_head_input_major
        else:
            weight = self.model.embed_tokens.weight  # a tied head: the embedding (or its slice)
        return linear(normed, weight, gemm=self._gemm, prepacked=self._head_packed).float()
