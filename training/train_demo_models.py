"""Trains pdserve's two built-in demo models on the CPython standard library, on CPU.

    python training/train_demo_models.py --out engine/demo_models

writes `demo/` (an `Ernie4_5_MoeForCausalLM` with one ERNIE multi-token-prediction layer) and
`demo-draft/` (a dense `Ernie4_5ForCausalLM` with >= 5x fewer parameters, for draft-model
speculative decoding) as Hugging Face checkpoint directories in bf16, sharing one tokenizer, plus
`training/results/demo_training.json` (final numbers) and `training/results/loss_curves.png`.

Data. The `*.py` files of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`), minus `site-packages`/`dist-packages` (what is installed
there differs between machines, the stdlib does not) and test code (`test`, `tests`, `idle_test`
directories and `test_*.py` files: a third of the bytes, mostly fixtures, and it would make the
corpus depend on whether the distribution ships its tests). Files are split with a fixed seed,
2% held out. Besides the plain code (each file followed by `</s>`), `ast` turns every function
with a docstring into a chat example: docstring as the user turn, the function's source as the
assistant turn, some with a system prompt, half of them with a short reasoning section
(`Signature: <def line>`) so that the gateway's reasoning parsing sees real `<think>` output.
Held-out files give the held-out code and chat examples.

Tokenizer. Byte-level BPE (Hugging Face `tokenizers`) trained on the training files. Special
tokens follow ERNIE 4.5's (`<unk>`=0 is also padding, `<s>`=1, `</s>`=2,
`<|begin_of_sentence|>`=3, `<|end_of_sentence|>`=4); `<think>` and `</think>` (the last two ids)
are added tokens that are *not* special, so they survive `skip_special_tokens` and a text-level reasoning
parser sees them, as with the hub's ERNIE 4.5 thinking models. The chat template mirrors ERNIE
4.5's text template (`<|begin_of_sentence|>`, system prompt + newline, `User: ...\n`,
`Assistant: ...<|end_of_sentence|>`) and borrows the thinking convention of ERNIE-4.5-VL's:
the generation prompt is `Assistant: <think>\n`, closed at once (`\n</think>\n\n`) unless
`enable_thinking` is true, so thinking is off by default and the model writes
`<reasoning>\n</think>\n\n<answer>` when it is on. Reasoning is dropped from earlier assistant
turns. Prompt and completion are tokenized separately in training, exactly as a server
tokenizes the rendered prompt: byte-level BPE pre-tokenizes a trailing `\n\n` differently when
text follows it.

MTP. As in ERNIE's own training code (PaddleNLP/ERNIEKit `ErnieModel.forward`): for position t,
`x = mtp_linear_proj(concat([mtp_emb_norm(embed(token[t+1])), mtp_hidden_norm(h[t])]))`, where
`h` is the main model's last decoder layer output *before* the final norm (ERNIE appends the
hidden state to `mtp_outputs` before `self.norm`; here a pre-hook on `model.norm` captures it,
since transformers' `last_hidden_state` is after the norm). `x` goes through `mtp_block` (one
decoder layer, causal self-attention over the MTP sequence, RoPE positions t as in the main
model; it is a dense layer because its index, `num_hidden_layers`, is past
`moe_layer_end_index`), then the shared `model.norm` and the tied LM head, predicting token
t+2. Loss = main CE + 0.3 * MTP CE (+ a small router load-balancing loss). Besides that loss, the
routers' `e_score_correction_bias` is nudged towards balanced expert load after every step
(DeepSeek-V3's auxiliary-loss-free balancing, which is what that ERNIE tensor is for), so the
shipped checkpoint exercises the bias path of the routing code.

Reproducibility: seeded (data split, data order, init); bit-identical reruns need the same
Python (the corpus is its stdlib), library versions, and `--threads`. Step counts, not wall
time, decide how long each model trains; `--max-minutes` only cuts a run short, and says so in
the JSON.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import random
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent

# ERNIE 4.5's special tokens, in id order (the hub models have <unk>=0, <s>=1, </s>=2 too).
UNK, BOS, EOS, CLS, SEP = "<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, CLS, SEP]
THINK, END_THINK = "<think>", "</think>"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELD_OUT_FRACTION = 0.02

CHAT_TEMPLATE = r"""{#- ERNIE 4.5 turn structure; thinking as in ERNIE-4.5-VL: off unless enable_thinking is true. -#}
{#- Tools in ERNIE 4.5's format: calls as <tool_call>{json}</tool_call>, results as <tool_output>. -#}
{%- macro text(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro tool_list() -%}
    {{- 'You may call these tools:\n<tool_list>\n' -}}
    {%- for tool in tools -%}
        {{- (tool['function'] if tool['function'] is defined else tool) | tojson -}}{{- '\n' -}}
    {%- endfor -%}
    {{- '</tool_list>\nTo call one, answer <tool_call>{"name": <name>, "arguments": <object>}</tool_call>\n' -}}
{%- endmacro -%}
{{- '<|begin_of_sentence|>' -}}
{%- if tools and messages[0]['role'] != 'system' -%}{{- tool_list() -}}{%- endif -%}
{%- for message in messages -%}
    {%- set content = text(message['content']) -%}
    {%- if message['role'] == 'system' -%}
        {{- content + '\n' -}}
        {%- if tools and loop.first -%}{{- tool_list() -}}{%- endif -%}
    {%- elif message['role'] == 'user' -%}
        {{- 'User: ' + content + '\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {{- 'User: <tool_output>\n' + content + '\n</tool_output>\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- if '</think>' in content -%}
            {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {{- 'Assistant: ' + content -}}
        {%- for call in message['tool_calls'] or [] -%}
            {%- set args = call['function']['arguments'] -%}
            {{- '<tool_call>{"name": ' + call['function']['name'] | tojson + ', "arguments": ' -}}
            {{- (args if args is string else args | tojson) + '}</tool_call>' -}}
        {%- endfor -%}
        {{- '<|end_of_sentence|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'Assistant: <think>\n' -}}
    {%- if not (enable_thinking is defined and enable_thinking) -%}
        {{- '\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}"""

SYSTEM_PROMPTS = [
    "You are a helpful Python programming assistant.",
    "You write Python functions from their descriptions.",
    "Answer with Python code.",
]


@dataclass
class ModelShape:
    """Architecture of one model; MoE fields are ignored for the dense draft."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 1


@dataclass
class TrainSettings:
    """Optimisation settings for one model."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    router_aux_coef: float = 0.01
    bias_update_rate: float = 1e-3


DEMO_SHAPE = ModelShape(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=256,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
)
DRAFT_SHAPE = ModelShape(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
)
SMOKE_DEMO_SHAPE = ModelShape(64, 128, 3, 4, 2, 16, 4, 2, 64, 1, 1)
SMOKE_DRAFT_SHAPE = ModelShape(32, 64, 1, 2, 1, 16)


# ----------------------------------------------------------------------------------------- data


def stdlib_files(limit: int | None = None) -> list[tuple[str, str]]:
    """(relative path, source) of the stdlib's non-test `*.py` files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for file in sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix()):
        rel = file.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel.as_posix(), text))
    return out[:limit] if limit else out


def split_files(files: list[tuple[str, str]], seed: int) -> tuple[list, list]:
    """Train and held-out files: a seeded shuffle, HELD_OUT_FRACTION of the files held out."""
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(files) * HELD_OUT_FRACTION))
    held = set(order[:n_held])
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


@dataclass
class ChatExample:
    """One single-turn chat: the rendered prompt is built with the tokenizer's template."""

    messages: list[dict]
    thinking: bool
    reasoning: str
    answer: str


def chat_examples(source: str, rng: random.Random, max_chars: int = 1500) -> list[ChatExample]:
    """Docstring -> function chats for every documented function of one file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        # Whole lines from `def` (decorators excluded) to the end of the body. Not
        # ast.get_source_segment: it re-splits the whole file on every call, minutes over the stdlib.
        segment = "".join(lines[node.lineno - 1 : node.end_lineno])
        if not doc or len(doc) < 20 or len(segment) > max_chars:
            continue
        answer = textwrap.dedent(segment).strip("\n")
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": doc})
        thinking = rng.random() < 0.5
        out.append(ChatExample(messages, thinking, f"Signature: {answer.splitlines()[0].strip()}", answer))
    return out


def build_tokenizer(train_files: list[tuple[str, str]], vocab_size: int):
    """Byte-level BPE with ERNIE's special tokens and the chat template, as a transformers tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # <think> and </think> are added after training
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat markup is frequent in the training stream, so let the merges see it too.
    markup = ["User: ", "Assistant: ", "Signature: def ", *SYSTEM_PROMPTS] * 200
    tok.train_from_iterator([text for _, text in train_files] + markup, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in (THINK, END_THINK)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=UNK,  # ERNIE pads with <unk> (pad_token_id 0)
        cls_token=CLS,
        sep_token=SEP,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    assert [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(fast) == vocab_size, f"BPE stopped at {len(fast)} tokens; the corpus is too small"
    return fast


def encode_docs(tokenizer, files: list[tuple[str, str]], seed: int) -> tuple[list[list[int]], dict]:
    """Token ids of every code document and chat example made from `files`, and their counts."""
    rng = random.Random(seed)
    # The backend tokenizer directly: same ids, without transformers' warning about long inputs.
    backend = tokenizer.backend_tokenizer

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    code = [[*ids, tokenizer.eos_token_id] for ids in encode([text for _, text in files])]
    examples = [ex for _, text in files for ex in chat_examples(text, rng)]
    prompts = [
        tokenizer.apply_chat_template(
            ex.messages, tokenize=False, add_generation_prompt=True, enable_thinking=ex.thinking
        )
        for ex in examples
    ]
    completions = [(f"{ex.reasoning}\n{END_THINK}\n\n" if ex.thinking else "") + ex.answer for ex in examples]
    sep = tokenizer.sep_token_id
    chats = [p + c + [sep] for p, c in zip(encode(prompts), encode(completions))]
    stats = {
        "files": len(files),
        "code_tokens": sum(map(len, code)),
        "chat_examples": len(chats),
        "chat_examples_thinking": sum(ex.thinking for ex in examples),
        "chat_tokens": sum(map(len, chats)),
    }
    return code + chats, stats


def pack(docs: list[list[int]], seq_len: int, seed: int) -> torch.Tensor:
    """Shuffled documents concatenated and cut into [N, seq_len + 1] windows (inputs + next token)."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    n = (len(stream) - 1) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx]


def batches(chunks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of windows, reshuffled every epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(chunks), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield chunks[order[i : i + batch_size]]


# --------------------------------------------------------------------------------------- models


def token_ids(tokenizer) -> dict:
    """bos/eos/pad for config.json: a chat turn ends with <|end_of_sentence|>, a document with </s>."""
    return dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.sep_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )


def make_demo(shape: ModelShape, vocab_size: int, ids: dict, settings: TrainSettings):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    config = Ernie4_5_MoeConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=2048,
        # Trained on 512-token windows: the usual 10k base resolves those positions better than
        # ERNIE's 500k, which is tuned for 128k contexts.
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        use_bias=False,
        tie_word_embeddings=True,
        moe_num_experts=shape.moe_num_experts,
        moe_k=shape.moe_k,
        moe_intermediate_size=shape.moe_intermediate_size,
        moe_num_shared_experts=shape.moe_num_shared_experts,
        moe_layer_start_index=shape.moe_layer_start_index,
        moe_layer_end_index=-1,
        moe_layer_interval=1,
        router_aux_loss_coef=settings.router_aux_coef,
        **ids,
    )
    assert shape.hidden_size // shape.num_attention_heads == shape.head_dim  # MoE config derives it
    return Ernie4_5_MoeForCausalLM(config)


def make_draft(shape: ModelShape, vocab_size: int, ids: dict):
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    config = Ernie4_5Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,  # transformers' dense default is 128 when absent
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        use_bias=False,
        tie_word_embeddings=True,
        **ids,
    )
    return Ernie4_5ForCausalLM(config)


class MTPHead(nn.Module):
    """ERNIE's multi-token-prediction layer; attribute names are the checkpoint's (`model.` prefix)."""

    def __init__(self, config) -> None:
        from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import (
            Ernie4_5_MoeDecoderLayer,
            Ernie4_5_MoeRMSNorm,
        )

        super().__init__()
        h = config.hidden_size
        self.mtp_emb_norm = nn.ModuleList([Ernie4_5_MoeRMSNorm(h, config.rms_norm_eps)])
        self.mtp_hidden_norm = nn.ModuleList([Ernie4_5_MoeRMSNorm(h, config.rms_norm_eps)])
        self.mtp_linear_proj = nn.ModuleList([nn.Linear(2 * h, h, bias=config.use_bias)])
        # Index num_hidden_layers is past moe_layer_end_index: a dense layer, as pdserve builds it.
        self.mtp_block = nn.ModuleList([Ernie4_5_MoeDecoderLayer(config, config.num_hidden_layers)])
        std = config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)

    def forward(self, model, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Logits for token t+2 from pre-norm hidden states h[t] [B, T, H] and token ids t+1 [B, T]."""
        emb = model.model.embed_tokens(next_ids)
        x = self.mtp_linear_proj[0](
            torch.cat([self.mtp_emb_norm[0](emb), self.mtp_hidden_norm[0](hidden)], dim=-1)
        )
        positions = torch.arange(x.shape[1])[None, :]
        cos_sin = model.model.rotary_emb(x, positions)
        # attention_mask=None: SDPA then runs causal attention over the MTP sequence.
        x = self.mtp_block[0](x, position_embeddings=cos_sin, attention_mask=None, position_ids=positions)
        return model.lm_head(model.model.norm(x))


class PreNormCapture:
    """Keeps the input of `model.model.norm`: the last decoder layer's output, which MTP consumes."""

    def __init__(self, model) -> None:
        self.value: torch.Tensor | None = None
        model.model.norm.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args) -> None:
        self.value = args[0]


def count_params(*modules: nn.Module) -> int:
    """Distinct parameters (the tied LM head counted once)."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    # e_score_correction_bias is a (frozen) parameter too; it is in the checkpoint, so counted.
    return sum(seen.values())


# ------------------------------------------------------------------------------------- training


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(modules: list[nn.Module], s: TrainSettings) -> torch.optim.Optimizer:
    params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )


def moe_blocks(model) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def update_expert_bias(model, router_logits, rate: float) -> float:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones.

    Returns the worst layer's max/mean expert load, for the progress bar.
    """
    worst = 0.0
    for block, logits in zip(moe_blocks(model), router_logits):
        bias = block.gate.moe_statics.e_score_correction_bias
        probs = F.softmax(logits.float(), dim=-1)
        _, chosen = torch.topk(probs + bias, block.gate.top_k, dim=-1)
        load = torch.bincount(chosen.flatten(), minlength=bias.shape[-1]).float()
        load = load / load.mean()
        bias += rate * torch.sign(1.0 - load)
        worst = max(worst, load.max().item())
    return worst


def demo_losses(model, mtp: MTPHead, capture: PreNormCapture, chunk: torch.Tensor, with_aux: bool):
    """(main CE, MTP CE, router aux loss or None, router logits, main logits, mtp logits)."""
    x, y = chunk[:, :-1], chunk[:, 1:]
    out = model(input_ids=x, output_router_logits=with_aux, use_cache=False)
    hidden = capture.value
    main = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    mtp_logits = mtp(model, hidden[:, :-1], x[:, 1:])
    mtp_loss = F.cross_entropy(mtp_logits.flatten(0, 1), y[:, 1:].flatten())
    return main, mtp_loss, out.aux_loss if with_aux else None, out.router_logits, out.logits, mtp_logits


@torch.no_grad()
def evaluate(model, chunks: torch.Tensor, batch_size: int, mtp=None, capture=None) -> dict:
    """Mean held-out CE (nats/token) over `chunks`; with MTP, also its CE and top-1 accuracy on t+2."""
    model.eval()
    tot = {"loss": 0.0, "mtp_loss": 0.0, "mtp_correct": 0, "tokens": 0, "mtp_tokens": 0}
    for i in range(0, len(chunks), batch_size):
        chunk = chunks[i : i + batch_size]
        y = chunk[:, 1:]
        if mtp is None:
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
            main = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        else:
            main, _, _, _, _, mtp_logits = demo_losses(model, mtp, capture, chunk, with_aux=False)
            main = main * y.numel()
            target = y[:, 1:]
            tot["mtp_loss"] += F.cross_entropy(
                mtp_logits.flatten(0, 1), target.flatten(), reduction="sum"
            ).item()
            tot["mtp_correct"] += (mtp_logits.argmax(-1) == target).sum().item()
            tot["mtp_tokens"] += target.numel()
        tot["loss"] += main.item()
        tot["tokens"] += y.numel()
    model.train()
    out = {"loss": tot["loss"] / tot["tokens"], "tokens": tot["tokens"]}
    if mtp is not None:
        out["mtp_loss"] = tot["mtp_loss"] / tot["mtp_tokens"]
        out["mtp_top1_accuracy"] = tot["mtp_correct"] / tot["mtp_tokens"]
    return out


def train(
    name: str,
    model,
    settings: TrainSettings,
    train_chunks: torch.Tensor,
    eval_chunks: torch.Tensor,
    seed: int,
    eval_every: int,
    deadline: float | None,
    mtp: MTPHead | None = None,
) -> dict:
    """Trains `model` (and `mtp` jointly, if given); returns the loss history."""
    capture = PreNormCapture(model) if mtp is not None else None
    modules = [model] + ([mtp] if mtp is not None else [])
    opt = make_optimizer(modules, settings)
    history: dict = {"step": [], "train_loss": [], "train_mtp_loss": [], "eval_step": [], "eval_loss": []}
    history["eval_mtp_loss"] = []
    data = batches(train_chunks, settings.batch_size, seed)
    model.train()
    start = time.time()
    tokens = 0
    truncated = False
    bar = tqdm(range(settings.steps), desc=f"train {name}", dynamic_ncols=True, mininterval=5)
    for step in bar:
        if deadline is not None and time.time() > deadline:
            truncated = True
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        chunk = next(data)
        if mtp is None:
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
            loss = main = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            mtp_loss = None
        else:
            main, mtp_loss, aux, router_logits, _, _ = demo_losses(model, mtp, capture, chunk, with_aux=True)
            loss = main + settings.mtp_lambda * mtp_loss + settings.router_aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], settings.grad_clip)
        opt.step()
        tokens += chunk[:, 1:].numel()
        postfix = {"loss": f"{main.item():.3f}"}
        if mtp is not None:
            load = update_expert_bias(model, router_logits, settings.bias_update_rate)
            postfix |= {"mtp": f"{mtp_loss.item():.3f}", "max_load": f"{load:.2f}"}
        postfix["tok/s"] = f"{tokens / (time.time() - start):.0f}"
        bar.set_postfix(postfix, refresh=False)
        history["step"].append(step)
        history["train_loss"].append(main.item())
        history["train_mtp_loss"].append(mtp_loss.item() if mtp_loss is not None else None)
        if (step + 1) % eval_every == 0 or step + 1 == settings.steps:
            ev = evaluate(model, eval_chunks, settings.batch_size, mtp, capture)
            history["eval_step"].append(step + 1)
            history["eval_loss"].append(ev["loss"])
            history["eval_mtp_loss"].append(ev.get("mtp_loss"))
            tqdm.write(
                f"{name} step {step + 1}: held-out loss {ev['loss']:.3f}"
                + (f", mtp {ev['mtp_loss']:.3f}" if mtp is not None else "")
            )
    bar.close()
    history["steps_done"] = len(history["step"])
    history["truncated"] = truncated
    history["tokens_seen"] = tokens
    history["seconds"] = time.time() - start
    return history


# ------------------------------------------------------------------------------ analysis, saving


def unigram_entropy(chunks: torch.Tensor) -> float:
    """Entropy (nats) of the held-out targets' own unigram distribution."""
    counts = torch.bincount(chunks[:, 1:].flatten()).float()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def greedy_agreement(demo, draft, mtp: MTPHead, chunks: torch.Tensor, n: int, prefix: int, new: int) -> dict:
    """Teacher-forced agreement with the target's greedy continuation of held-out prefixes.

    The target (`demo`) continues `n` held-out prefixes greedily by `new` tokens; the draft's
    argmax and the MTP head's t+2 argmax are checked against each of those tokens, given the
    target's own context: the rates at which speculative decoding would accept their tokens one
    position at a time.
    """
    demo.eval()
    draft.eval()
    capture = PreNormCapture(demo)
    prefixes = chunks[:n, :prefix]
    seq = demo.generate(prefixes, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    cont = seq[:, prefix:]
    draft_pred = draft(input_ids=seq[:, :-1]).logits.argmax(-1)[:, prefix - 1 :]
    demo(input_ids=seq[:, :-1], use_cache=False)
    # MTP at position t (hidden h[t], token t+1) predicts t+2: positions prefix-2 .. end-2.
    mtp_pred = mtp(demo, capture.value[:, :-1], seq[:, 1:-1]).argmax(-1)[:, prefix - 2 :]
    return {
        "prefixes": n,
        "prefix_tokens": prefix,
        "continuation_tokens": new,
        "draft_agreement": (draft_pred == cont).float().mean().item(),
        "mtp_agreement": (mtp_pred == cont).float().mean().item(),
    }


@torch.no_grad()
def sample_chats(model, tokenizer, examples: list[ChatExample], max_new_tokens: int) -> list[dict]:
    """Greedy answers of `model` to held-out chat prompts, verbatim."""
    model.eval()
    out = []
    for ex in examples:
        prompt = tokenizer.apply_chat_template(
            ex.messages, tokenize=False, add_generation_prompt=True, enable_thinking=ex.thinking
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)
        out.append(
            {"messages": ex.messages, "enable_thinking": ex.thinking, "prompt": prompt, "answer": text}
        )
    return out


def keep_fp32(name: str) -> bool:
    """Router weights and correction biases stay fp32 in bf16 checkpoints, as transformers saves them."""
    return name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")


def save_checkpoint(model, out_dir: Path, tokenizer, mtp: MTPHead | None, gen_defaults: dict) -> None:
    """Hugging Face directory: bf16 safetensors (plus `model.mtp_*`), config, generation config, tokenizer."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        # transformers writes the hub's tensor names (per-expert weights, not its fused layout).
        model.save_pretrained(tmp)
        tensors = {}
        with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[name] = f.get_tensor(name)
        config = json.loads((Path(tmp) / "config.json").read_text())
    if mtp is not None:
        for name, t in mtp.state_dict().items():
            tensors[f"model.{name}"] = t
        config["num_nextn_predict_layers"] = 1
    tensors = {
        k: (v.float() if keep_fp32(k) else v.to(torch.bfloat16)).contiguous()
        for k, v in sorted(tensors.items())
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    config.pop("transformers_version", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen = GenerationConfig(**ids, **gen_defaults)
    gen.save_pretrained(str(out_dir))
    gen_file = out_dir / "generation_config.json"
    gen_json = json.loads(gen_file.read_text())
    gen_json.pop("transformers_version", None)
    gen_file.write_text(json.dumps(gen_json, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 records its own backend class name; older releases need the fast class's.
    tok_config_file = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # The template goes where the hub's ERNIE 4.5 checkpoints keep it, not in a side file that
    # transformers 5 writes and gateways reading tokenizer_config.json would miss.
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    tok_config["chat_template"] = CHAT_TEMPLATE
    tok_config_file.write_text(json.dumps(tok_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def file_hashes(out: Path) -> dict[str, str]:
    return {
        f.relative_to(out).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(out.rglob("*"))
        if f.is_file() and f.parent != out
    }


def plot(histories: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for (name, h), color in zip(histories.items(), ("tab:blue", "tab:orange")):
        steps, train = h["step"], h["train_loss"]
        k = max(1, len(train) // 100)  # smooth the per-step noise for readability
        smooth = [
            sum(train[max(0, i - k + 1) : i + 1]) / len(train[max(0, i - k + 1) : i + 1])
            for i in range(len(train))
        ]
        ax.plot(steps, smooth, color=color, alpha=0.6, label=f"{name} train")
        ax.plot(h["eval_step"], h["eval_loss"], "o-", color=color, label=f"{name} held-out")
        if name == "demo":
            mtp = [v for v in h["train_mtp_loss"] if v is not None]
            smooth_mtp = [
                sum(mtp[max(0, i - k + 1) : i + 1]) / len(mtp[max(0, i - k + 1) : i + 1])
                for i in range(len(mtp))
            ]
            ax.plot(steps, smooth_mtp, color="tab:green", alpha=0.6, label="demo MTP (t+2) train")
            ax.plot(h["eval_step"], h["eval_mtp_loss"], "o-", color="tab:green", label="demo MTP held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("pdserve demo models on the CPython stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "engine" / "demo_models", help="writes demo/ and demo-draft/ here"
    )
    p.add_argument("--results", type=Path, default=REPO / "training" / "results", help="JSON and PNG go here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--demo-steps", type=int, default=900)
    p.add_argument("--draft-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-chunks", type=int, default=16, help="held-out windows for the periodic evaluation")
    p.add_argument(
        "--max-minutes", type=float, default=None, help="hard cap on total wall time (cuts training)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny models, few files and steps: checks the pipeline"
    )
    args = p.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    deadline = t0 + 60 * args.max_minutes if args.max_minutes else None
    demo_shape, draft_shape = (
        (SMOKE_DEMO_SHAPE, SMOKE_DRAFT_SHAPE) if args.smoke else (DEMO_SHAPE, DRAFT_SHAPE)
    )

    files = stdlib_files(limit=60 if args.smoke else None)
    train_files, held_files = split_files(files, args.seed)
    print(
        f"stdlib: {len(files)} files ({sum(len(t) for _, t in files) / 1e6:.1f} MB), {len(held_files)} held out"
    )
    tokenizer = build_tokenizer(train_files, 512 if args.smoke else args.vocab_size)
    vocab = len(tokenizer)
    train_docs, train_stats = encode_docs(tokenizer, train_files, args.seed)
    held_docs, held_stats = encode_docs(tokenizer, held_files, args.seed + 1)
    train_chunks = pack(train_docs, args.seq_len, args.seed)
    held_chunks = pack(held_docs, args.seq_len, args.seed)
    print(f"vocab {vocab}; train {train_stats}; held-out {held_stats}")
    print(f"{len(train_chunks)} train / {len(held_chunks)} held-out windows of {args.seq_len} tokens")
    eval_chunks = held_chunks[: args.eval_chunks]
    ids = token_ids(tokenizer)

    demo_settings = TrainSettings(
        args.demo_steps, args.batch_size, lr=2e-3, warmup_steps=max(1, args.demo_steps // 20)
    )
    draft_settings = TrainSettings(
        args.draft_steps, args.batch_size, lr=3e-3, warmup_steps=max(1, args.draft_steps // 20)
    )

    torch.manual_seed(args.seed)
    demo = make_demo(demo_shape, vocab, ids, demo_settings)
    mtp = MTPHead(demo.config)
    demo_params = count_params(demo, mtp)
    torch.manual_seed(args.seed + 1)
    draft = make_draft(draft_shape, vocab, ids)
    draft_params = count_params(draft)
    print(
        f"demo {demo_params / 1e6:.2f}M params (MTP {count_params(mtp) / 1e6:.2f}M), draft {draft_params / 1e6:.2f}M"
    )
    assert demo_params >= 5 * draft_params, "the draft must have at least 5x fewer parameters than demo"

    demo_hist = train(
        "demo", demo, demo_settings, train_chunks, eval_chunks, args.seed, args.eval_every, deadline, mtp
    )
    draft_hist = train(
        "demo-draft",
        draft,
        draft_settings,
        train_chunks,
        eval_chunks,
        args.seed + 1,
        args.eval_every,
        deadline,
    )

    print("final evaluation on all held-out windows")
    capture = PreNormCapture(demo)
    demo_eval = evaluate(demo, held_chunks, args.batch_size, mtp, capture)
    draft_eval = evaluate(draft, held_chunks, args.batch_size)
    n_agree = min(32, len(held_chunks))
    agreement = greedy_agreement(demo, draft, mtp, held_chunks, n_agree, prefix=64, new=32)
    rng = random.Random(args.seed + 2)
    held_examples = [ex for _, text in held_files for ex in chat_examples(text, random.Random(args.seed + 1))]
    picked = rng.sample(held_examples, min(2, len(held_examples)))
    if picked:
        picked[0].thinking, picked[-1].thinking = False, True
    samples = sample_chats(demo, tokenizer, picked, max_new_tokens=160)

    gen_defaults = {"do_sample": True, "temperature": 0.8, "top_p": 0.8}  # ERNIE 4.5's published defaults
    save_checkpoint(demo, args.out / "demo", tokenizer, mtp, gen_defaults)
    save_checkpoint(draft, args.out / "demo-draft", tokenizer, None, gen_defaults)

    def window_mean(values: list[float], n: int = 50) -> float:
        return sum(values[-n:]) / len(values[-n:])

    results = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "seed": args.seed,
        "threads": args.threads,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "machine": platform.machine(),
        "wall_seconds": time.time() - t0,
        "data": {
            "source": "CPython stdlib *.py, excluding site-packages/dist-packages and test code",
            "held_out_fraction": HELD_OUT_FRACTION,
            "held_out_files": [path for path, _ in held_files],
            "file_list_sha256": hashlib.sha256("\n".join(path for path, _ in files).encode()).hexdigest(),
            "train": train_stats,
            "held_out": held_stats,
            "seq_len": args.seq_len,
            "train_windows": len(train_chunks),
            "held_out_windows": len(held_chunks),
            "held_out_unigram_entropy_nats": unigram_entropy(held_chunks),
        },
        "tokenizer": {"vocab_size": vocab, "uniform_loss_nats": math.log(vocab)},
        "models": {},
        "greedy_agreement": agreement,
        "sample_chats": samples,
    }
    for name, params, shape, settings, hist, ev in (
        ("demo", demo_params, demo_shape, demo_settings, demo_hist, demo_eval),
        ("demo-draft", draft_params, draft_shape, draft_settings, draft_hist, draft_eval),
    ):
        entry = {
            "architecture": type(demo if name == "demo" else draft).__name__,
            "params": params,
            "shape": asdict(shape),
            "settings": asdict(settings),
            "steps_done": hist["steps_done"],
            "truncated_by_max_minutes": hist["truncated"],
            "tokens_seen": hist["tokens_seen"],
            "train_seconds": hist["seconds"],
            "final_train_loss_last50": window_mean(hist["train_loss"]),
            "final_train_perplexity_last50": math.exp(window_mean(hist["train_loss"])),
            "held_out_loss": ev["loss"],
            "held_out_perplexity": math.exp(ev["loss"]),
            "held_out_tokens": ev["tokens"],
            "curve": {k: hist[k] for k in ("eval_step", "eval_loss", "eval_mtp_loss")},
        }
        if name == "demo":
            entry["mtp_params"] = count_params(mtp)
            entry["final_train_mtp_loss_last50"] = window_mean(hist["train_mtp_loss"])
            entry["held_out_mtp_loss"] = ev["mtp_loss"]
            entry["held_out_mtp_top1_accuracy_t_plus_2"] = ev["mtp_top1_accuracy"]
            entry["e_score_correction_bias_abs_max"] = max(
                b.gate.moe_statics.e_score_correction_bias.abs().max().item() for b in moe_blocks(demo)
            )
        results["models"][name] = entry
    results["size_bytes"] = {
        name: sum(f.stat().st_size for f in (args.out / name).iterdir()) for name in ("demo", "demo-draft")
    }
    results["file_sha256"] = file_hashes(args.out)

    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "demo_training.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    plot({"demo": demo_hist, "demo-draft": draft_hist}, args.results / "loss_curves.png")
    print(
        json.dumps(
            {k: v for k, v in results.items() if k not in ("sample_chats", "file_sha256", "data")}, indent=2
        )[:4000]
    )
    print(f"done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
