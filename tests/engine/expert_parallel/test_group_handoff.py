"""The PD hooks of an expert-parallel group (what a decode worker calls): KV prefilled by one
engine lands in the rank that reserved it and decodes there, and a request moved out of a group
mid-decode continues on one engine; greedy and seeded tokens equal one engine alone's."""

from __future__ import annotations

import pytest

from pdserve.engine import LLM, SamplingParams
from tests.prompts import prompts_of

ARGS = {"dtype": "float32", "block_size": 4, "kv_cache_blocks": 32, "num_threads": 1, "progress": False}
PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=11, max_tokens=12, ignore_eos=True),
]


@pytest.fixture(scope="module")
def group(moe_checkpoint):
    llm = LLM(str(moe_checkpoint), **ARGS, expert_parallel={"size": 2})
    yield llm.engine
    llm.close()


def prefill(engine, request_id, prompt, params):
    engine.add_request(request_id, prompt, params, prefill_only=True)
    while not any(d.kv_ready for d in engine.step()):
        pass
    payload = engine.export_kv(request_id)
    engine.release_exported(request_id)
    return payload


def test_kv_lands_in_a_rank_and_moves_out_token_exact(moe_checkpoint, group):
    prompts = prompts_of([10, 7, 13, 9], seed=41)
    alone = LLM(str(moe_checkpoint), **ARGS).generate(prompts, PARAMS)
    expected = {str(i): o.outputs[0].token_ids for i, o in enumerate(alone)}
    plain = LLM(str(moe_checkpoint), **ARGS).engine
    got: dict[str, list[int]] = {}
    for i, (prompt, params) in enumerate(zip(prompts, PARAMS)):
        assert group.reserve_kv(str(i), len(prompt))
        payload = prefill(plain, str(i), prompt, params)
        assert group.has_reservation(str(i))
        group.import_kv(payload)
        got[str(i)] = list(payload.output_token_ids)
    # Reservations went to the rank with fewer requests: two each, blocks taken on both.
    ranks = group.stats().ranks
    assert [r.rank for r in ranks] == [0, 1]
    assert all(r.kv_blocks_free < r.kv_blocks_total == 32 for r in ranks)
    assert sum(r.num_running for r in ranks) == 4 and min(r.num_running for r in ranks) == 2
    while min(len(t) for t in got.values()) < 5:
        for d in group.step():
            got[d.request_id] += d.new_token_ids
    for rid in ("1", "2"):  # one from each rank moves to the plain engine, as a role switch does
        payload = group.export_kv(rid)
        group.release_exported(rid)
        assert plain.reserve_kv(rid, payload.num_computed_tokens)
        plain.import_kv(payload)
    for engine in (group, plain):
        while engine.has_unfinished():
            for d in engine.step():
                got[d.request_id] += d.new_token_ids
    assert got == expected
    stats = group.stats()
    assert stats.kv_blocks_total == 64 and stats.kv_blocks_free == 64
    assert stats.num_running == stats.num_waiting == 0 and not group.request_ids()


def test_reservations_are_refused_without_room_and_cancelled(group):
    assert group.reserve_kv("a", 25 * 4) and group.reserve_kv("b", 25 * 4)  # one on each rank
    assert [r.kv_blocks_free for r in group.stats().ranks] == [7, 7]
    # 14 blocks free in all, but a request's KV must fit one rank: refused, nothing taken.
    assert not group.reserve_kv("c", 10 * 4)
    assert group.stats().kv_blocks_free == 14
    assert group.reserve_kv("d", 7 * 4) and group.has_reservation("d")
    assert group.stats().kv_blocks_free == 7
    for rid in ("a", "b", "d"):
        assert group.cancel_reservation(rid) and not group.has_reservation(rid)
    assert group.stats().kv_blocks_free == 64
    with pytest.raises(KeyError, match="not in this group"):
        group.export_kv("nobody")


def test_a_guided_request_imported_into_a_group_keeps_its_grammar(moe_checkpoint, group):
    from pdserve.engine import GuidedDecoding

    params = SamplingParams(
        temperature=0.9, seed=5, max_tokens=8, guided_decoding=GuidedDecoding("regex", "(ab|cd)+ ?x?")
    )
    prompt = prompts_of([8], seed=61)[0]
    alone = LLM(str(moe_checkpoint), **ARGS).generate([prompt], params)[0].outputs[0]
    plain = LLM(str(moe_checkpoint), **ARGS).engine
    assert group.compile_grammar(params).done()  # the rank importing it compiles the grammar
    assert group.reserve_kv("g", len(prompt))
    payload = prefill(plain, "g", prompt, params)
    group.import_kv(payload)
    out = list(payload.output_token_ids)
    while group.has_unfinished():
        out += [t for d in group.step() for t in d.new_token_ids]
    assert out == alone.token_ids
