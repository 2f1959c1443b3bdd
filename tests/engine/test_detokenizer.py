import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pdserve.engine.detokenizer import DetokenizerStep, IncrementalDetokenizer
from pdserve.engine.sampling_params import SamplingParams

CORPUS = [
    "naïve café 日本語 😀 hello world",
    "the quick brown fox jumps over the lazy dog",
    "Stop here. STOP now! ### end of story",
    "über straße, ½ € and 🙂🙃 are multi-byte",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # A small vocabulary keeps most non-ASCII characters split across several byte tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False
    )


def stream(
    tokenizer: PreTrainedTokenizerFast,
    output_ids: Sequence[int],
    prompt_ids: Sequence[int] = (),
    chunk_sizes: Sequence[int] = (1,),
    **params: object,
) -> tuple[list[DetokenizerStep], str, IncrementalDetokenizer]:
    """Feed `output_ids` in chunks (cycling `chunk_sizes`); return the steps and the flushed tail."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params))  # type: ignore[arg-type]
    steps = []
    pos = 0
    i = 0
    while pos < len(output_ids) and not detok.finished:
        size = chunk_sizes[i % len(chunk_sizes)]
        steps.append(detok.add_tokens(output_ids[pos : pos + size]))
        pos += size
        i += 1
    return steps, detok.flush(), detok


def full_decode(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int], skip: bool = True) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip)


def test_fixture_splits_characters_across_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    # The other tests are only meaningful if some character needs more than one token.
    ids = tokenizer.encode("日本語 😀", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("skip", [True, False])
def test_streaming_equals_full_decode_for_random_sequences(
    tokenizer: PreTrainedTokenizerFast, skip: bool
) -> None:
    rng = random.Random(1234)
    vocab = len(tokenizer)
    for _ in range(150):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        chunks = [rng.randrange(1, 4) for _ in range(3)]
        steps, tail, detok = stream(tokenizer, output, prompt, chunks, skip_special_tokens=skip)
        text = "".join(s.new_text for s in steps) + tail
        assert text == full_decode(tokenizer, output, skip), (prompt, output, chunks)
        assert detok.output_text == text


def test_streaming_equals_full_decode_for_real_text(tokenizer: PreTrainedTokenizerFast) -> None:
    for sentence in CORPUS:
        ids = tokenizer.encode(sentence, add_special_tokens=False)
        prompt = tokenizer.encode("prompt: ", add_special_tokens=False)
        steps, tail, _ = stream(tokenizer, ids, prompt)
        assert "".join(s.new_text for s in steps) + tail == sentence


def test_no_replacement_char_mid_stream(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "naïve café 日本語 😀 über 🙂🙃"
    ids = tokenizer.encode(text, add_special_tokens=False)
    steps, tail, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in s.new_text for s in steps)
    assert tail == ""
    assert "".join(s.new_text for s in steps) == text
    # Some tokens produced no text (their character was incomplete) and a later one caught up.
    assert any(s.new_text == "" for s in steps)


def test_prompt_context_is_not_emitted(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = tokenizer.encode("the quick brown", add_special_tokens=False)
    output = tokenizer.encode(" fox jumps", add_special_tokens=False)
    steps, tail, _ = stream(tokenizer, output, prompt)
    assert "".join(s.new_text for s in steps) + tail == " fox jumps"


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def split_ids_inside(tokenizer: PreTrainedTokenizerFast, before: str, stop: str, after: str) -> list[int]:
    """Token ids for before+stop+after, where the stop string is cut between two calls' tokens."""
    half = len(stop) // 2
    return encode(tokenizer, before + stop[:half]) + encode(tokenizer, stop[half:] + after)


def test_stop_string_spanning_tokens_is_truncated(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = split_ids_inside(tokenizer, "the lazy dog ", "STOP", " now more text")
    steps, tail, detok = stream(tokenizer, ids, stop=["STOP"])
    stopped = [s for s in steps if s.stopped_on is not None]
    assert len(stopped) == 1 and stopped[0].stopped_on == "STOP"
    assert steps[-1] is stopped[0], "no tokens are consumed after the stop"
    assert "".join(s.new_text for s in steps) == "the lazy dog "
    assert tail == ""
    assert detok.output_text == "the lazy dog "
    assert detok.stopped_on == "STOP"
    # Tokens after a stop are ignored.
    assert detok.add_tokens(encode(tokenizer, "dog")) == DetokenizerStep("", None)


def test_streamed_text_is_never_retracted(tokenizer: PreTrainedTokenizerFast) -> None:
    # "S", "ST", "STO" each look like the start of "STOP": none of it may be streamed early.
    ids = split_ids_inside(tokenizer, "over the ", "STOP", " x")
    steps, _, _ = stream(tokenizer, ids, stop=["STOP"])
    emitted = ""
    for step in steps:
        emitted += step.new_text
        assert "S" not in emitted


def test_include_stop_str_in_output_keeps_it(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = split_ids_inside(tokenizer, "the lazy dog ", "STOP", " now more text")
    steps, tail, detok = stream(tokenizer, ids, stop=["STOP"], include_stop_str_in_output=True)
    assert steps[-1].stopped_on == "STOP"
    assert "".join(s.new_text for s in steps) + tail == "the lazy dog STOP"
    assert detok.output_text == "the lazy dog STOP"


def test_earliest_of_several_stop_strings_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, "fox jumps over the lazy dog")
    steps, _, detok = stream(tokenizer, ids, chunk_sizes=[len(ids)], stop=["lazy", "jumps"])
    assert steps[-1].stopped_on == "jumps"
    assert detok.output_text == "fox "


def test_stop_string_with_multibyte_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, "naïve café 日本語 😀 hello")
    steps, _, detok = stream(tokenizer, ids, stop=["本語"])
    assert steps[-1].stopped_on == "本語"
    assert detok.output_text == "naïve café 日"


def test_held_back_text_released_when_no_stop_materialises(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, "the lazy dog ST")
    steps, tail, detok = stream(tokenizer, ids, stop=["STOP"])
    streamed = "".join(s.new_text for s in steps)
    # At most len("STOP") - 1 characters are held back.
    assert streamed == "the lazy dog"
    assert tail == " ST"
    assert detok.output_text == "the lazy dog ST"
    assert all(s.stopped_on is None for s in steps)


def test_hold_back_is_released_as_text_moves_past(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(tokenizer, "Stop here. the quick brown fox")
    steps, tail, _ = stream(tokenizer, ids, stop=["STOP"])
    streamed = "".join(s.new_text for s in steps)
    assert streamed == "Stop here. the quick brown fox"[: len(streamed)]
    assert len(streamed) >= len("Stop here. the quick brown fox") - 3
    assert streamed + tail == "Stop here. the quick brown fox"


def test_stop_terminated_token_text_is_dropped(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    ids = encode(tokenizer, "hello")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=False))
    text = detok.add_tokens(ids).new_text
    text += detok.add_tokens([eos], stop_terminated=True).new_text + detok.flush()
    assert text == "hello"
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=False))
    text = detok.add_tokens([*ids, eos]).new_text + detok.flush()
    assert text == "hello<eos>"


def test_skip_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    ids = [*encode(tokenizer, "hello"), eos, *encode(tokenizer, " world")]
    steps, tail, _ = stream(tokenizer, ids)
    assert "".join(s.new_text for s in steps) + tail == "hello world"
    steps, tail, _ = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(s.new_text for s in steps) + tail == "hello<eos> world"


def first_stop_truncation(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: cut `text` at the first stop string to complete (earliest end, then start)."""
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    end, start, stop = min(hits)
    return text[: end if include else start], stop


@pytest.mark.parametrize("include", [False, True])
def test_random_stops_match_reference_whatever_the_chunking(
    tokenizer: PreTrainedTokenizerFast, include: bool
) -> None:
    rng = random.Random(99)
    texts = [*CORPUS, "the dog the fox the dog STOP here 日本語日本"]
    for _ in range(150):
        text = rng.choice(texts)
        ids = encode(tokenizer, text)
        stops = []
        for _ in range(rng.randrange(1, 4)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randrange(1, 6)])
        stops.append("never appears")
        expected, expected_stop = first_stop_truncation(text, stops, include)
        chunks = [rng.randrange(1, 5) for _ in range(3)]
        steps, tail, detok = stream(
            tokenizer, ids, chunk_sizes=chunks, stop=stops, include_stop_str_in_output=include
        )
        streamed = ""
        for step in steps:
            streamed += step.new_text
            assert expected.startswith(streamed), "streamed text must never be retracted"
        assert streamed + tail == expected, (text, stops, chunks)
        assert detok.stopped_on == expected_stop
