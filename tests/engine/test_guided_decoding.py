"""Guided decoding in the engine (llguidance), on the bundled demo model and its real tokenizer.

Outputs must match their grammar; free requests in the same batch must get exactly the tokens
they get alone; speculation and the prefill->decode handoff must not change a guided output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest

from pdserve.engine import LLM, Engine, EngineConfig, GuidedDecoding, SamplingParams
from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.sampling_params import SamplingParamsError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "kind", "ok", "tags"],
    "additionalProperties": False,
}
JSON = GuidedDecoding("json_schema", json.dumps(SCHEMA))
PROMPT = (
    'User: describe a pet as JSON, e.g. {"name": "Rex", "kind": "dog", "ok": true, "tags": []}\nAssistant: '
)
FREE_PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n",
    "class Stack:\n    def push(self, x):\n",
]


def guided(seed: int | None, **kw) -> SamplingParams:
    kw.setdefault("guided_decoding", JSON)
    return SamplingParams(temperature=0.9 if seed is not None else 0, seed=seed, max_tokens=80, **kw)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="demo", num_threads=1, progress=False, block_size=8)


def texts(outs) -> list[str]:
    return [o.outputs[0].text for o in outs]


def test_json_schema_outputs_validate_for_every_seed(llm):
    outs = llm.generate([PROMPT] * 12, [guided(seed) for seed in range(12)])
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    assert len(set(texts(outs))) > 1  # sampled, not one answer forced
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize(
    ("kind", "value", "check"),
    [
        ("regex", r"[0-9]{3}-[a-z]{2,4}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        ("choice", json.dumps(["alpha", "beta", "gamma"]), lambda t: t in ("alpha", "beta", "gamma")),
        ("json_object", "", lambda t: isinstance(json.loads(t), dict)),
        ("grammar", 'start: "say " ("yes" | "no")', lambda t: t in ("say yes", "say no")),
    ],
)
def test_each_kind_constrains_the_output(llm, kind, value, check):
    for seed in range(3):
        out = llm.generate([PROMPT], guided(seed, guided_decoding=GuidedDecoding(kind, value)))[0].outputs[0]
        assert check(out.text), out.text
        assert out.finish_reason == "stop"


def test_free_requests_in_a_mixed_batch_get_exactly_their_tokens_alone(llm):
    free = [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=1.0, seed=7, max_tokens=24),
    ]
    alone = [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(FREE_PROMPTS, free)]
    prompts = [FREE_PROMPTS[0], PROMPT, FREE_PROMPTS[1], PROMPT]
    params = [free[0], guided(1), free[1], guided(None)]
    outs = llm.generate(prompts, params)
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    for out in (outs[1], outs[3]):
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1},
        {"method": "mtp", "num_speculative_tokens": 2},
    ],
    ids=["ngram", "mtp"],
)
def test_speculation_gives_exactly_the_plain_guided_output(llm, spec):
    spec_llm = LLM(model="demo", num_threads=1, progress=False, block_size=8, speculative_config=spec)
    params = [guided(seed) for seed in range(4)] + [guided(None)]
    want = [o.outputs[0].token_ids for o in llm.generate([PROMPT] * 5, params)]
    got = [o.outputs[0].token_ids for o in spec_llm.generate([PROMPT] * 5, params)]
    assert got == want
    stats = spec_llm.engine.stats()
    assert stats.spec_verifications > 0 and stats.spec_accepted_tokens > 0
    assert spec_llm.engine.kv.num_free_blocks == spec_llm.engine.kv.num_blocks


def test_guesses_the_grammar_refuses_are_cut_before_verification(llm):
    engine = llm.engine
    matcher = engine.compile_grammar(guided(0, guided_decoding=GuidedDecoding("regex", "ab+"))).result()
    tok = engine.tokenizer
    a, b, c = (tok.encode(x, add_special_tokens=False)[0] for x in ("a", "b", "c"))
    guesses = [a, b, c, b]
    engine.grammars.trim_guesses(matcher, guesses)
    assert guesses == [a, b]
    assert matcher.consume_tokens([a, b])  # trimming left the grammar where it was


def test_masks_filled_during_the_pass_equal_each_row_filled_alone(llm):
    """`start_masks` fills plain rows on the mask thread; rows with guesses, broken matchers and
    free rows around them must come out as one row at a time under llguidance's own fill."""
    import llguidance.torch as llg_torch
    import torch

    from pdserve.engine.structured_output import GuidedRows

    grammars, tok = llm.engine.grammars, llm.engine.tokenizer
    fresh = [grammars.compile(JSON).result() for _ in range(3)]
    for matcher, text in zip(fresh, ['{"name": "R', '{"name": "Rex", "kind": ', "{"]):
        assert matcher.consume_tokens(tok.encode(text, add_special_tokens=False))
    regex = grammars.compile(GuidedDecoding("regex", "ab+")).result()
    a, b = (tok.encode(x, add_special_tokens=False)[0] for x in ("a", "b"))
    broken = grammars.compile(GuidedDecoding("regex", "a")).result()
    assert not broken.consume_token(b) and broken.is_error()
    # Logits rows: 0 free, 1 plain, 2-4 the regex with guesses [a, b], 5 free, 6 plain, 7 broken, 8 plain.
    rows = [GuidedRows(1, fresh[0]), GuidedRows(2, regex, [a, b]), GuidedRows(6, fresh[1]),
            GuidedRows(7, broken), GuidedRows(8, fresh[2])]  # fmt: skip
    vocab = grammars.vocab_size
    logits = torch.randn(9, vocab + 3, generator=torch.Generator().manual_seed(0))
    want = logits.clone()
    masked = grammars.start_masks(rows)
    grammars.mask_logits(logits, masked)

    def allowed(matcher, through: list[int] = ()) -> torch.Tensor:
        assert all(matcher.consume_token(t) for t in through)
        bits = llg_torch.allocate_token_bitmask(1, vocab)
        llg_torch.fill_next_token_bitmask(matcher, bits)
        if through:
            matcher.rollback(len(through))
        return ((bits[0].view(torch.uint8).unsqueeze(1) >> torch.arange(8)) & 1).bool().flatten()[:vocab]

    masks = {1: allowed(fresh[0]), 2: allowed(regex), 3: allowed(regex, [a]), 4: allowed(regex, [a, b]),
             6: allowed(fresh[1]), 8: allowed(fresh[2])}  # fmt: skip
    masks[7] = torch.zeros(vocab, dtype=torch.bool)
    masks[7][grammars.eos_token_id] = True
    for row, ok in masks.items():
        want[row, :vocab][~ok] = -float("inf")
    assert torch.equal(logits, want)
    assert 0 < int(masks[1].sum()) < vocab and not torch.equal(masks[1], masks[6])


def test_a_request_moved_after_prefill_continues_its_grammar():
    """The decode side rebuilds the grammar state from the output so far (the prefill's token)."""
    config = EngineConfig(model="demo", num_threads=1, progress=False, block_size=8)
    prefill, decode, plain = Engine(config), Engine(config), Engine(config)
    for seed in (3, None):
        params = guided(seed)
        plain.add_request("r", PROMPT, params)
        want = run(plain)["r"]
        prefill.add_request("r", PROMPT, params, prefill_only=True)
        first = run(prefill)["r"]
        payload = prefill.export_kv("r")
        prefill.release_exported("r")
        assert decode.reserve_kv("r", payload.num_computed_tokens)
        decode.import_kv(payload)
        assert first + run(decode)["r"] == want
        jsonschema.validate(json.loads(plain.tokenizer.decode(want[:-1])), SCHEMA)
    for e in (prefill, decode, plain):
        assert e.kv.num_free_blocks == e.kv.num_blocks


def run(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
            if delta.kv_ready:
                return tokens
    return tokens


@pytest.mark.parametrize(
    ("guided_decoding", "message"),
    [
        (GuidedDecoding("json_schema", '{"type": "objectx"}'), "objectx"),
        (GuidedDecoding("regex", "[a-z]+("), "unclosed group"),
        (GuidedDecoding("choice", "[]"), "non-empty list"),
        (GuidedDecoding("json_schema", "{not json"), "not valid JSON"),
    ],
)
def test_an_invalid_grammar_is_refused_at_once_and_changes_nothing(llm, guided_decoding, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        llm.engine.add_request("bad", PROMPT, guided(0, guided_decoding=guided_decoding))
    assert not llm.engine.has_unfinished() and "bad" not in llm.engine.request_ids()


def test_a_grammar_is_compiled_once_per_schema(llm):
    compiler = llm.engine.grammars
    first = compiler.compile(GuidedDecoding("regex", "x[0-9]+y")).result()
    again = compiler.compile(GuidedDecoding("regex", "x[0-9]+y"))
    assert again.done()  # from the cache: no compile, no wait
    assert again.result() is not first  # each request gets its own state


def test_an_aborted_request_waiting_for_its_grammar_leaves_nothing(llm):
    engine = llm.engine
    engine.add_request("a", PROMPT, guided(0, guided_decoding=GuidedDecoding("regex", "[a-z]{5}q[0-9]{7}")))
    assert engine.abort("a")
    assert not engine.has_unfinished() and engine.kv.num_free_blocks == engine.kv.num_blocks


def test_logit_bias_shifts_the_choice(llm):
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
    target = 1000 if plain[0] != 1000 else 1001
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logit_bias={target: 100.0}))
    assert out[0].outputs[0].token_ids == [target] * 4
    banned = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=1, logit_bias={plain[0]: -100.0})
    )
    assert banned[0].outputs[0].token_ids[0] != plain[0]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"guided_decoding": JSON, "min_tokens": 3}, "min_tokens"),
        ({"guided_decoding": JSON, "ignore_eos": True}, "ignore_eos"),
        ({"guided_decoding": GuidedDecoding("xml", "")}, "guided_decoding"),
    ],
)
def test_sampling_params_refuse_bad_values_by_name(changes, field):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**changes)
    assert e.value.field == field


def test_a_request_resumed_with_its_output_in_the_prompt_continues_its_grammar(llm):
    """What the router sends another worker after a failure: prompt + output so far, and how many
    of those tokens are output (the grammar is advanced past them, not started over)."""
    whole = llm.generate([PROMPT], guided(None))[0]
    prompt, out = whole.prompt_token_ids, whole.outputs[0].token_ids
    done = 7
    resumed_guided = GuidedDecoding(JSON.kind, JSON.value, num_output_in_prompt=done)
    rest = llm.generate([prompt + out[:done]], guided(None, guided_decoding=resumed_guided))[0].outputs[0]
    assert out[:done] + rest.token_ids == out
    jsonschema.validate(json.loads(whole.outputs[0].text), SCHEMA)


def test_a_guided_request_does_not_load_torch_compile():
    # llguidance.torch wraps a function in torch.compile at import: torch._dynamo and sympy, ~140 MB
    # and seconds holding the GIL on a worker's first guided request (under load, long enough for
    # the controller to miss its heartbeats and kill it). The numpy helpers fill the same masks.
    script = (
        "import sys, json\n"
        "from pdserve.engine import LLM, GuidedDecoding, SamplingParams\n"
        "llm = LLM(model='demo', num_threads=1, progress=False)\n"
        "params = SamplingParams(max_tokens=8, guided_decoding=GuidedDecoding('json_object', ''))\n"
        "out = llm.generate(['Answer in JSON:'], params)[0].outputs[0]\n"
        "print(json.dumps([out.text, 'torch._dynamo' in sys.modules, 'sympy' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text, dynamo, sympy = json.loads(done.stdout.strip().splitlines()[-1])
    assert text.startswith("{")  # the mask applied
    assert not dynamo and not sympy
