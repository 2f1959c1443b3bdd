"""Engine behaviour: batching, prefix caching, preemption, sampling, stops, abort, PD hooks."""

from __future__ import annotations

import pytest

from pdserve.engine import LLM, Engine, EngineConfig, KVCacheEvent, SamplingParams
from tests.engine.reference import assert_same_greedy, hf_model
from tests.prompts import prompts_of

GREEDY = SamplingParams(temperature=0, max_tokens=20, min_tokens=20)


def make_llm(checkpoint, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("progress", False)
    return LLM(str(checkpoint), **kw)


@pytest.fixture(scope="module")
def llm(moe_checkpoint):
    return make_llm(moe_checkpoint, kv_cache_blocks=256, block_size=4)


@pytest.fixture(scope="module")
def ref_model(moe_checkpoint):
    return hf_model(moe_checkpoint)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def assert_all_blocks_free(llm):
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert not llm.engine.has_unfinished()


def test_batch_invariance_alone_vs_busy_batch_with_chunking(moe_checkpoint, ref_model):
    prompts = prompts_of([3, 9, 30, 57, 12])
    alone_llm = make_llm(moe_checkpoint, block_size=4)
    alone = [tokens(alone_llm.generate([p], GREEDY))[0] for p in prompts]
    # A small token budget forces chunked prefill mixed with other requests' decodes.
    busy_llm = make_llm(moe_checkpoint, block_size=4, max_num_batched_tokens=16)
    together = tokens(busy_llm.generate(prompts, GREEDY))
    for p, a, t in zip(prompts, alone, together):
        assert len(t) == 20
        assert_same_greedy(ref_model, p, a, t)
    assert_all_blocks_free(busy_llm)


def test_equal_length_prompts_prefilled_together_match_each_alone(moe_checkpoint, llm, ref_model):
    # Whole prompts of one length, side by side in a step, share one attention call; a prompt
    # of another length between them starts a new group.
    prompts = prompts_of([20, 20, 20, 33, 20, 20], seed=8)  # longer than MAX_BATCHED_QUERY
    alone = [tokens(llm.generate([p], GREEDY))[0] for p in prompts]
    fresh = make_llm(moe_checkpoint, block_size=4)  # no prefix hits: every prompt is whole
    spans = []
    prepare = fresh.engine.runner.prepare

    def recording_prepare(batch, num_logits):
        inputs = prepare(batch, num_logits)
        spans.append([(s.num_seqs, s.end - s.start) for s in inputs.meta.prefills])
        return inputs

    fresh.engine.runner.prepare = recording_prepare
    together = tokens(fresh.generate(prompts, GREEDY))
    assert spans[0] == [(3, 60), (1, 33), (2, 40)]
    for p, a, t in zip(prompts, alone, together):
        assert_same_greedy(ref_model, p, a, t)
    assert_all_blocks_free(fresh)


def test_prefix_cache_hit_reported_and_outputs_equal_without_cache(moe_checkpoint, ref_model):
    shared = prompts_of([40], seed=3)[0]
    tails = prompts_of([5, 7], seed=4)
    prompts = [shared + tails[0], shared + tails[1]]
    cached = make_llm(moe_checkpoint, block_size=4)
    first = cached.generate([prompts[0]], GREEDY)[0]
    second = cached.generate([prompts[1]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40  # the shared 40 tokens are 10 full blocks
    stats = cached.engine.stats()
    assert stats.prefix_cache_hit_tokens == 40
    plain = make_llm(moe_checkpoint, block_size=4, enable_prefix_caching=False)
    ref = plain.generate(prompts, GREEDY)
    assert ref[1].num_cached_tokens == 0
    for p, a, b in zip(prompts, tokens(ref), tokens([first, second])):
        assert_same_greedy(ref_model, p, a, b)
    # Repeating the full prompt still computes its last token (the step needs its logits).
    again = cached.generate([prompts[1]], GREEDY)[0]
    assert again.num_cached_tokens == (len(prompts[1]) - 1) // 4 * 4
    assert_all_blocks_free(cached)


def test_preemption_recomputes_to_the_same_tokens(moe_checkpoint, ref_model):
    prompts = prompts_of([20, 24, 28, 16])
    roomy = make_llm(moe_checkpoint, block_size=4)
    expected = tokens(roomy.generate(prompts, GREEDY))
    # 40 blocks x 4 tokens cannot hold four 40-token sequences at once.
    tight = make_llm(moe_checkpoint, block_size=4, kv_cache_blocks=40)
    got = tokens(tight.generate(prompts, GREEDY))
    assert tight.engine.stats().num_preemptions > 0
    for p, a, b in zip(prompts, expected, got):
        assert_same_greedy(ref_model, p, a, b)
    assert_all_blocks_free(tight)


def test_seeded_sampling_reproducible_whatever_the_batch(llm):
    prompts = prompts_of([6, 11, 25])
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = tokens(llm.generate([prompts[1]], sampled))[0]
    others = SamplingParams(temperature=0.8, max_tokens=12)
    mixed = tokens(llm.generate(prompts, [others, sampled, others]))[1]
    assert mixed == alone
    other_seed = tokens(
        llm.generate([prompts[1]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99))
    )[0]
    assert other_seed != alone


def test_n_choices_compute_their_prompt_once(moe_checkpoint):
    # LLM.generate runs n=4 as four requests of one prompt; the prompt's full blocks are computed
    # by the first and shared by the other three (each computes only its last partial block).
    prompt = prompts_of([42])[0]
    llm = make_llm(moe_checkpoint, block_size=4)
    sampled = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=11)
    out = llm.generate([prompt], sampled)[0]
    assert llm.engine.stats().prefix_cache_hit_tokens == 3 * 40  # 10 of the prompt's 11 blocks, 3 times
    # Each choice is what the same seed gives alone, on an engine that computes everything itself.
    plain = make_llm(moe_checkpoint, block_size=4, enable_prefix_caching=False)
    for i, choice in enumerate(out.outputs):
        alone = plain.generate([prompt], SamplingParams(temperature=1.0, max_tokens=8, seed=11 + i))[0]
        assert choice.token_ids == alone.outputs[0].token_ids
    assert_all_blocks_free(llm)


def test_n_samples_use_distinct_seeds(llm):
    out = llm.generate(prompts_of([8]), SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=5))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(seqs)) == 3
    # child 1 of seed 5 is the same as a single request with seed 6
    single = llm.generate(prompts_of([8]), SamplingParams(temperature=1.0, max_tokens=10, seed=6))[0]
    assert single.outputs[0].token_ids == out.outputs[1].token_ids


def test_stop_string_truncates_text_and_reports_it(llm):
    prompt = "def add(a, b):"
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, min_tokens=24))[0].outputs[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    first = text.index(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first]
    kept = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == text[: first + len(stop)]
    assert_all_blocks_free(llm)


def test_detokenize_off_gives_the_same_tokens_without_text(llm):
    prompts = ["def add(a, b):", [5, 6, 7, 8]]
    with_text = llm.generate(prompts, GREEDY)
    ids_only = llm.generate(prompts, GREEDY.clone(detokenize=False))
    assert tokens(ids_only) == tokens(with_text)
    assert all(o.outputs[0].text == "" for o in ids_only)
    assert all(o.outputs[0].text for o in with_text)
    assert_all_blocks_free(llm)


def test_stop_token_ids_eos_and_length(llm):
    prompt = prompts_of([10])[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_tok = free.token_ids[4]
    first = free.token_ids.index(stop_tok)
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok], ignore_eos=True)
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == free.token_ids[: first + 1]
    # min_tokens keeps stop tokens from ending the request early
    late = llm.generate(
        [prompt],
        SamplingParams(
            temperature=0, max_tokens=12, min_tokens=first + 2, stop_token_ids=[stop_tok], ignore_eos=True
        ),
    )[0].outputs[0]
    assert len(late.token_ids) >= first + 2


def test_logprobs_are_returned_per_token(llm):
    out = llm.generate(prompts_of([7]), SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and lp[tok].rank == 1  # greedy picks the top token
        assert len(lp) == 3
        assert all(v.logprob <= 0 for v in lp.values())


def test_abort_frees_blocks_and_others_finish(moe_checkpoint):
    engine = Engine(
        EngineConfig(
            model=str(moe_checkpoint), dtype="float32", progress=False, block_size=4, kv_cache_blocks=64
        )
    )
    p = prompts_of([12, 12])
    engine.add_request("a", p[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.add_request("b", p[1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.kv.num_free_blocks < 64
    assert engine.abort("a")
    assert not engine.abort("a")
    done = {}
    while engine.has_unfinished():
        for d in engine.step():
            assert d.request_id == "b"
            done.setdefault(d.request_id, []).extend(d.new_token_ids)
    assert len(done["b"]) == 8 - 3
    assert engine.kv.num_free_blocks == 64


def test_bad_requests_are_refused_and_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([[1, 2, 10_000]], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 2000], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="sampling_params has 2 entries"):
        llm.generate([[5, 6]], [GREEDY, GREEDY])
    assert len(llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids) == 20
    assert_all_blocks_free(llm)


def test_text_prompt_without_tokenizer_is_a_clear_error(tmp_path):
    from tests.conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "no-tok", moe=False)
    bare = make_llm(path)
    assert bare.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.generate(["hello"], GREEDY)
    out = bare.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""


def test_cache_events_report_stored_and_evicted_blocks(moe_checkpoint):
    events: list[KVCacheEvent] = []
    llm = make_llm(moe_checkpoint, block_size=4, kv_cache_blocks=8, on_cache_event=events.append)
    a, b = prompts_of([20, 20], seed=9)
    llm.generate([a], SamplingParams(temperature=0, max_tokens=2))
    stored = [h for e in events for h in e.stored]
    assert len(stored) == 5  # 21 computed tokens -> 5 full blocks
    assert set(stored) == set(llm.engine.cached_block_hashes())
    llm.generate([b], SamplingParams(temperature=0, max_tokens=2))
    removed = {h for e in events for h in e.removed}
    assert removed and removed <= set(stored)
    assert set(llm.engine.cached_block_hashes()).isdisjoint(removed)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=16, min_tokens=16),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=16, seed=7),
    ],
    ids=["greedy", "seeded"],
)
def test_prefill_export_import_equals_single_engine(moe_checkpoint, params):
    cfg = dict(model=str(moe_checkpoint), dtype="float32", progress=False, block_size=4, kv_cache_blocks=64)
    single = Engine(EngineConfig(**cfg))
    prefill = Engine(EngineConfig(**cfg))
    decode = Engine(EngineConfig(**cfg))
    prompts = prompts_of([9, 22])

    def run(engine, ids):
        out = {}
        while engine.has_unfinished():
            for d in engine.step():
                out.setdefault(d.request_id, []).extend(d.new_token_ids)
        return out

    for i, p in enumerate(prompts):
        single.add_request(str(i), p, params)
    expected = run(single, None)

    got: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        prefill.add_request(str(i), p, params, prefill_only=True)
    while prefill.has_unfinished():
        for d in prefill.step():
            assert d.kv_ready and not d.finished
            got[d.request_id] = list(d.new_token_ids)
            payload = prefill.export_kv(d.request_id)
            assert payload.num_blocks == -(-len(prompts[int(d.request_id)]) // 4)
            decode.import_kv(payload)
            prefill.release_exported(d.request_id)
    for rid, toks in run(decode, None).items():
        got[rid] += toks
    assert got == expected
    for engine in (single, prefill, decode):
        assert engine.kv.num_free_blocks == 64


@pytest.mark.parametrize(
    ("params", "spec"),
    [
        (SamplingParams(temperature=0, max_tokens=24, min_tokens=24), None),
        (SamplingParams(temperature=1.0, top_k=20, max_tokens=24, seed=7), None),
        (
            SamplingParams(temperature=0, max_tokens=24, min_tokens=24),
            {"method": "mtp", "num_speculative_tokens": 2},
        ),
        (
            SamplingParams(temperature=1.0, max_tokens=24, seed=3),
            {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
        ),
    ],
    ids=["greedy", "seeded", "greedy-mtp", "seeded-ngram"],
)
def test_a_decoding_request_moves_to_another_engine_and_continues_exactly(params, spec):
    # Live migration: after some decode steps, a running request's KV and state leave one engine
    # and enter another, which continues it to exactly the tokens one engine alone produces. (The
    # bundled demo model: it has the MTP layer.)
    cfg = dict(model="demo", dtype="float32", progress=False, block_size=4, kv_cache_blocks=64,
               speculative_config=spec)  # fmt: skip
    single, source, target = (Engine(EngineConfig(**cfg)) for _ in range(3))
    prompts = prompts_of([9, 22], seed=5)

    def drain(engine, out):
        while engine.has_unfinished():
            for d in engine.step():
                out.setdefault(d.request_id, []).extend(d.new_token_ids)
        return out

    for i, p in enumerate(prompts):
        single.add_request(str(i), p, params)
        source.add_request(str(i), p, params)
    expected = drain(single, {})
    got: dict[str, list[int]] = {}
    while min((len(got.get(str(i), [])) for i in range(2)), default=0) < 6:  # a few tokens in each
        for d in source.step():
            got.setdefault(d.request_id, []).extend(d.new_token_ids)
    for rid in ("0", "1"):
        payload = source.export_kv(rid)
        assert payload.output_token_ids == got[rid]
        source.release_exported(rid)
        target.import_kv(payload)
    assert not source.has_unfinished()
    assert drain(target, got) == expected
    for engine in (single, source, target):
        assert engine.kv.num_free_blocks == 64


def test_a_request_still_in_prefill_cannot_be_exported(moe_checkpoint):
    engine = make_llm(moe_checkpoint, block_size=4, kv_cache_blocks=32, max_num_batched_tokens=4).engine
    engine.add_request("long", prompts_of([20])[0], GREEDY)
    engine.step()  # 4 of 20 prompt tokens computed
    with pytest.raises(KeyError, match="neither prefilled nor decoding"):
        engine.export_kv("long")
    engine.abort("long")


def test_reserved_blocks_are_held_used_by_import_and_returned_on_cancel(moe_checkpoint):
    prefill = make_llm(moe_checkpoint, block_size=4, kv_cache_blocks=32).engine
    decode = make_llm(moe_checkpoint, block_size=4, kv_cache_blocks=32).engine
    prompt = prompts_of([10], seed=11)[0]
    assert decode.reserve_kv("r", len(prompt))
    assert decode.stats().kv_blocks_free == 32 - 3
    assert not decode.reserve_kv("too-big", 30 * 4)  # refused whole: nothing taken
    assert decode.stats().kv_blocks_free == 32 - 3
    with pytest.raises(ValueError, match="already in use"):
        decode.reserve_kv("r", 4)
    prefill.add_request("r", prompt, GREEDY, prefill_only=True)
    while not any(d.kv_ready for d in prefill.step()):
        pass
    payload = prefill.export_kv("r")
    prefill.release_exported("r")
    decode.import_kv(payload)
    assert decode.stats().kv_blocks_free == 32 - 3  # the import used the reserved blocks
    out = []
    while decode.has_unfinished():
        out += [t for d in decode.step() for t in d.new_token_ids]
    alone = make_llm(moe_checkpoint, block_size=4).generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert payload.output_token_ids + out == alone
    assert decode.reserve_kv("c", 8) and decode.cancel_reservation("c")
    assert not decode.cancel_reservation("c")
    assert decode.stats().kv_blocks_free == 32
