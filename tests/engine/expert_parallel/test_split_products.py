"""Products split over an expert-parallel group's ranks (`split_dense`): the LM head by vocabulary
row, large dense and shared-expert MLPs by intermediate unit; each rank holds a slice and the group
gathers the columns in split-product rounds. The embedding is split by the same vocabulary rows and
its lookups gather rows in lookup rounds. Outputs must stay token-identical to one engine (greedy
and seeded, with MTP, with idle ranks), with slices of unequal width and products of different widths."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.engine import _materialize, build_model_shell, model_config_of
from pdserve.engine.expert_parallel.config import ExpertParallelConfig
from pdserve.engine.expert_parallel.dispatch import ExpertDispatcher
from pdserve.engine.expert_parallel.placement import ExpertPlacement, base_range
from pdserve.engine.layers.linear import CpuGemm, is_input_major
from pdserve.engine.llm import LLM
from pdserve.engine.loader import init_dummy_weights
from pdserve.engine.model_source import resolve_model
from pdserve.engine.sampling_params import SamplingParams

from .test_group import ARGS, GREEDY, PROMPTS, SEEDED, tokens
from .test_metrics import LoopbackCollective


@pytest.fixture(scope="module")
def reference() -> dict[str, list[list[int]]]:
    one = LLM("demo", **ARGS)
    return {"greedy": tokens(one, GREEDY), "seeded": tokens(one, SEEDED)}


def _model(overrides: dict, vocab_slice: range | None = None):
    config = model_config_of(resolve_model("demo"), overrides)
    model = build_model_shell(config, torch.float32, None, False)
    _materialize(model, torch.device("cpu"))
    init_dummy_weights(model, seed=0, dtype=torch.float32)
    if vocab_slice is not None:
        model.keep_vocab_slice(vocab_slice.start, vocab_slice.stop)
    model.pack_for_cpu(CpuGemm(1, "torch"))
    return model.eval()


@pytest.mark.parametrize("rows", [1, 5])
def test_a_slice_of_the_head_computes_those_logits(rows):
    # 8199 x 256 crosses the oneDNN prepacking threshold (the 21B head's path); 8199 is odd, so
    # the two slices differ in width.
    overrides = {"vocab_size": 8199, "num_hidden_layers": 1, "num_nextn_predict_layers": 0}
    whole = _model(overrides)
    normed = torch.randn(rows, whole.config.hidden_size, generator=torch.Generator().manual_seed(1))
    want = whole.head_slice_logits(normed)
    for rank in range(2):
        part = base_range(rank, 2, 8199)
        sliced = _model(overrides, part)
        assert sliced._tied_head_input_major is not None and is_input_major(sliced._tied_head_input_major)
        assert sliced._tied_head_input_major.shape[0] == len(part)  # the copy holds the slice alone
        # The embedding keeps the same rows: a tied head's slice is the embedding's.
        assert torch.equal(
            sliced.model.embed_tokens.weight, whole.model.embed_tokens.weight[part.start : part.stop]
        )
        got = sliced.head_slice_logits(normed)
        assert got.shape == (rows, len(part))
        torch.testing.assert_close(got, want[:, part.start : part.stop], rtol=1e-6, atol=1e-5)
    with pytest.raises(AssertionError, match="gather_logits"):
        sliced.compute_logits(normed)  # a slice alone cannot give the whole vocabulary's logits
    with pytest.raises(AssertionError, match="gather_embeddings"):
        sliced.embed(torch.tensor([0, 8198]))  # nor look up every id


@pytest.mark.parametrize("size", [2, 3])
def test_split_head_matches_one_engine(reference, size):
    # 4096 over 3 ranks: slices of 1365 and 1366 rows, so the gathered slices are padded.
    group = LLM("demo", **ARGS, expert_parallel={"size": size})
    try:
        assert tokens(group, GREEDY) == reference["greedy"]
        assert tokens(group, SEEDED) == reference["seeded"]
        stats = group.engine.rank_stats()
        # Every rank asked the group for logits and computed its slice for the others' rows, and
        # gathered its tokens' embedding rows once per forward pass at least.
        assert all(s["split_rounds"] > 0 and s["split_compute_seconds"] > 0 for s in stats)
        assert all(s["lookup_rounds"] >= s["steps"] > 0 for s in stats)
        # One prompt: the other ranks have no tokens, yet serve its lookups and head rounds.
        [alone] = tokens_of(group, PROMPTS[:1], GREEDY)
        assert alone == reference["greedy"][0]
    finally:
        group.close()


def tokens_of(llm: LLM, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_whole_head_per_rank_still_matches(reference):
    group = LLM("demo", **ARGS, expert_parallel={"size": 2, "split_dense": False})
    try:
        assert tokens(group, GREEDY) == reference["greedy"]
        assert all(
            s["split_rounds"] == 0 and s["split_compute_seconds"] == 0 and s["lookup_rounds"] == 0
            for s in group.engine.rank_stats()
        )
    finally:
        group.close()


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_at_different_passes_share_split_rounds(size):
    # MTP with 3 guesses: ranks run proposal, verification and catch-up passes of their own, so
    # one rank's head or lookup round meets another's MoE round; one rank decodes alone at the end.
    spec = {"method": "mtp", "num_speculative_tokens": 3}
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (4, 16, 9, 12, 3)]
    prompts = ["def add(a, b):", "import os\nimport", "class Engine:", "The quick brown", "x = [1,"]
    plain = [o.outputs[0].token_ids for o in LLM("demo", **ARGS).generate(prompts, params)]
    group = LLM("demo", **ARGS, speculative_config=spec, expert_parallel={"size": size})
    try:
        assert [o.outputs[0].token_ids for o in group.generate(prompts, params)] == plain
        # The MTP layer looks up the embedding too: more lookups than main passes on some rank.
        assert any(s["lookup_rounds"] > s["steps"] for s in group.engine.rank_stats())
    finally:
        group.close()


def test_a_lookup_round_copies_the_rows_asked_for():
    vocab, hidden = 11, 6
    dispatcher = ExpertDispatcher(LoopbackCollective(), ExpertPlacement.initial([], 4, 1, 0), hidden)
    table = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(4))
    dispatcher.register_table(torch.nn.Embedding.from_pretrained(table), vocab)
    ids = torch.tensor([[3, 10, 0], [3, 7, 1]])
    assert torch.equal(dispatcher.gather_rows(ids), table[ids])  # bit for bit, in shape
    assert dispatcher.stats.lookup_rounds == 1
    assert dispatcher.gather_rows(torch.tensor([], dtype=torch.int64)).shape == (0, hidden)
    assert dispatcher.stats.lookup_rounds == 1  # asking for nothing takes no round
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\)"):
        dispatcher.gather_rows(torch.tensor([2, 11]))


def test_split_dense_must_be_a_bool():
    with pytest.raises(ValueError, match=r"expert_parallel\.split_dense must be true or false"):
        ExpertParallelConfig.from_dict({"size": 2, "split_dense": "yes"})


# Dense layer 0 (2 x 256 x 6144) and the shared experts (16 x 256 units: 2 x 256 x 4096) at or
# over SPLIT_MIN_ELEMENTS, so a group splits them beside the head (4096 rows, slices of 2048 at
# EP 2 against 3072 for layer 0: one round can carry products of different widths).
BIG_MLPS = {
    "load_format": "dummy",
    "hf_overrides": {"intermediate_size": 6144, "moe_num_shared_experts": 16},
}


def test_split_mlps_match_one_engine():
    params = [GREEDY, SEEDED]
    one = LLM("demo", **ARGS, **BIG_MLPS)
    want = [tokens(one, p) for p in params]
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    mtp_want = tokens(LLM("demo", **ARGS, **BIG_MLPS), GREEDY)
    group = LLM("demo", **ARGS, **BIG_MLPS, expert_parallel={"size": 2})
    try:
        assert [tokens(group, p) for p in params] == want
        stats = group.engine.rank_stats()
        # Per forward pass: dense layer 0, 3 shared-expert MLPs and the head, 5 split rounds.
        assert all(s["split_rounds"] >= 5 * s["steps"] > 0 for s in stats)
    finally:
        group.close()
    group = LLM("demo", **ARGS, **BIG_MLPS, speculative_config=spec, expert_parallel={"size": 2})
    try:
        assert tokens(group, GREEDY) == mtp_want
    finally:
        group.close()


def test_a_slice_of_an_mlp_computes_those_units():
    overrides = {"intermediate_size": 6144, "num_hidden_layers": 1, "num_nextn_predict_layers": 0}
    whole = _model(overrides).model.layers[0].mlp
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    want = whole.intermediate(x)
    config = model_config_of(resolve_model("demo"), overrides)
    model = build_model_shell(config, torch.float32, None, False)
    _materialize(model, torch.device("cpu"))
    init_dummy_weights(model, seed=0, dtype=torch.float32)
    sliced = model.model.layers[0].mlp
    sliced.keep_intermediate_slice(1000, 4000)
    model.pack_for_cpu(CpuGemm(1, "torch"))
    assert sliced.gate_proj.weight.shape == (3000, 256) and sliced.down_proj.weight.shape == (256, 6144)
    torch.testing.assert_close(sliced.intermediate(x), want[:, 1000:4000], rtol=1e-6, atol=1e-6)
    with pytest.raises(AssertionError, match="gather_intermediate"):
        sliced(x)  # the other units live on other ranks


def test_an_untied_head_keeps_its_slice_alone():
    overrides = {"vocab_size": 8199, "num_hidden_layers": 1, "num_nextn_predict_layers": 0}
    overrides |= {"tie_word_embeddings": False}
    whole = _model(overrides)
    normed = torch.randn(3, whole.config.hidden_size, generator=torch.Generator().manual_seed(3))
    want = whole.head_slice_logits(normed)
    part = base_range(1, 2, 8199)
    sliced = _model(overrides, part)
    assert sliced.lm_head is not None and sliced.lm_head.weight.shape == (len(part), 256)
    assert sliced.lm_head.out_features == len(part)
    torch.testing.assert_close(sliced.head_slice_logits(normed), want[:, part.start :], rtol=1e-6, atol=1e-5)
