"""Speculative decoding in the engine: outputs equal plain decoding's, token for token.

Runs on the bundled demo model (it has an MTP layer, and `demo-draft` shares its tokenizer), so
guesses are actually accepted and every path (accept, reject, bonus token) is exercised.
"""

from __future__ import annotations

import pytest

from pdserve.engine import LLM, Engine, EngineConfig, SamplingParams

METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    "mtp": {"method": "mtp", "num_speculative_tokens": 2},
    "draft": {"method": "draft", "model": "demo-draft", "num_speculative_tokens": 4},
}
PREFIX = "import os\nimport sys\n\n\ndef read_config(path):\n    with open(path) as f:\n"
PROMPTS = [
    "def fibonacci(n):\n    ",
    PREFIX + "        return f.read()\n",
    PREFIX + "        data = ",  # shares PREFIX's blocks with the one before
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def make_llm(spec: dict | None = None, **kw) -> LLM:
    kw.setdefault("block_size", 8)
    return LLM(model="demo", num_threads=1, progress=False, speculative_config=spec, **kw)


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def base() -> LLM:
    return make_llm()


@pytest.fixture(scope="module", params=list(METHODS))
def spec_llm(request) -> LLM:
    return make_llm(METHODS[request.param])


def assert_all_blocks_free(llm: LLM) -> None:
    e = llm.engine
    assert e.kv.num_free_blocks == e.kv.num_blocks
    draft = getattr(e.proposer, "draft", None)
    if draft is not None:
        assert draft.kv.num_free_blocks == draft.kv.num_blocks
        assert not e.proposer._shadows


def test_greedy_equals_plain_decoding_alone_and_in_a_mixed_batch(base, spec_llm):
    want = token_ids(base.generate(PROMPTS, GREEDY))
    before = spec_llm.engine.stats()
    alone = [token_ids(spec_llm.generate([p], GREEDY))[0] for p in PROMPTS]
    # In one batch the requests accept different numbers of guesses at each step, and the
    # third prompt finds the second's prefix blocks in the cache.
    batched = spec_llm.generate(PROMPTS, GREEDY)
    assert alone == want
    assert token_ids(batched) == want
    a, b = (spec_llm.engine.tokenize(p) for p in PROMPTS[1:3])
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert batched[2].num_cached_tokens == shared // 8 * 8 > 0
    stats = spec_llm.engine.stats()
    assert stats.spec_accepted_tokens > before.spec_accepted_tokens  # guesses really were accepted
    assert (
        stats.spec_proposed_tokens - before.spec_proposed_tokens
        > stats.spec_accepted_tokens - before.spec_accepted_tokens
    )
    assert stats.spec_mean_accepted_length > 1.0
    assert_all_blocks_free(spec_llm)


def test_seeded_sampling_with_penalties_emits_plain_decodings_tokens(base, spec_llm):
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=0.6, top_k=20, seed=12, max_tokens=32, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, seed=13, max_tokens=32, presence_penalty=0.5, min_tokens=8),
        SamplingParams(temperature=0, max_tokens=32, frequency_penalty=0.4, logprobs=2),
    ]
    want = base.generate(PROMPTS, params)
    got = spec_llm.generate(PROMPTS, params)
    assert token_ids(got) == token_ids(want)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    lp_got, lp_want = got[3].outputs[0].logprobs, want[3].outputs[0].logprobs
    assert [list(d) for d in lp_got] == [list(d) for d in lp_want]
    assert_all_blocks_free(spec_llm)


def test_stop_strings_and_max_tokens_are_never_overrun(base, spec_llm):
    plain = base.generate(PROMPTS[1], GREEDY)[0].outputs[0].text
    stop = plain[12:15]  # a stop string that appears mid-way through the output
    cases = [
        SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]
    for params in cases:
        want = base.generate(PROMPTS[1], params)[0].outputs[0]
        got = spec_llm.generate(PROMPTS[1], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
            want.stop_reason,
        )
        assert len(got.token_ids) <= params.max_tokens
    assert_all_blocks_free(spec_llm)


@pytest.mark.parametrize("method", list(METHODS))
def test_preemption_and_abort_keep_outputs_and_blocks(base, method):
    want = token_ids(base.generate(PROMPTS, GREEDY))
    # 13 blocks of 8 tokens cannot hold four ~70-token sequences at once: requests get preempted.
    small = make_llm(METHODS[method], kv_cache_blocks=13)
    got = token_ids(small.generate(PROMPTS, GREEDY))
    assert got == want
    assert small.engine.stats().num_preemptions > 0
    assert_all_blocks_free(small)

    engine = small.engine
    for i, p in enumerate(PROMPTS[:2]):
        engine.add_request(f"abort-{i}", p, GREEDY)
    for _ in range(6):
        engine.step()
    assert engine.stats().spec_verifications > 0
    assert engine.abort("abort-0") and engine.abort("abort-1")
    assert not engine.has_unfinished()
    assert_all_blocks_free(small)


def test_speculation_turns_off_for_large_batches(base):
    llm = make_llm({**METHODS["ngram"], "disable_by_batch_size": 2})
    want = token_ids(base.generate(PROMPTS, GREEDY))
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == want
    assert llm.engine.stats().spec_proposed_tokens == 0  # four running: never guessed
    llm.generate(PROMPTS[:2], GREEDY)
    assert llm.engine.stats().spec_proposed_tokens > 0


def test_a_burst_bigger_than_the_limit_skips_the_mtp_layer_from_its_first_step(base):
    # Four prompts arriving at once exceed the limit before any of them runs: feeding the MTP
    # layer during their prefill would be work for guesses that never come.
    llm = make_llm({**METHODS["mtp"], "disable_by_batch_size": 2})
    model = llm.engine.model
    calls = []
    mtp_forward = model.mtp_forward
    model.mtp_forward = lambda *a, **kw: calls.append(1) or mtp_forward(*a, **kw)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == token_ids(base.generate(PROMPTS, GREEDY))
    assert not calls and llm.engine.stats().spec_proposed_tokens == 0
    llm.generate(PROMPTS[:1], GREEDY)
    assert calls and llm.engine.stats().spec_proposed_tokens > 0


def test_mtp_guesses_survive_a_kv_handoff_between_engines(base):
    """Prefill on one engine, decode with MTP on another: the MTP layer's cache moves with the KV."""
    cfg = EngineConfig(
        model="demo", num_threads=1, progress=False, block_size=8, speculative_config=METHODS["mtp"]
    )
    prefill, decode = Engine(cfg), Engine(cfg)
    want = token_ids(base.generate(PROMPTS, GREEDY))
    for i, p in enumerate(PROMPTS):
        prefill.add_request(f"r{i}", p, GREEDY, prefill_only=True)
    firsts = {}
    while prefill.has_unfinished():
        for d in prefill.step():
            firsts[d.request_id] = d.new_token_ids
    for i in range(len(PROMPTS)):
        payload = prefill.export_kv(f"r{i}")
        assert payload.mtp_hidden is not None
        assert payload.kv.shape[0] == decode.kv_cache.tensor.shape[0]  # main layers + the MTP layer
        decode.import_kv(payload)
        prefill.release_exported(f"r{i}")
    got = {rid: list(t) for rid, t in firsts.items()}
    while decode.has_unfinished():
        for d in decode.step():
            got[d.request_id].extend(d.new_token_ids)
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want
    stats = decode.stats()
    assert stats.spec_accepted_tokens > 0
    assert prefill.kv.num_free_blocks == prefill.kv.num_blocks
    assert decode.kv.num_free_blocks == decode.kv.num_blocks
