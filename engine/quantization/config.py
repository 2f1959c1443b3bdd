"""`QuantizationConfig`: which weight-only scheme an engine runs, read from a setting or a checkpoint.

Torch-free, so the configuration schema (`pdserve.config`) refuses a bad scheme before anything
loads. The packed formats and their kernels are in `formats.py` and `kernels/quant_cpu.c`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

# Public scheme -> packed format ("q8", "q4": group-wise integers; "ccq": the 2-bit convolutional
# code; "q2", plain group-wise 2-bit, is wint2 with code "plain", kept for the comparison that
# chose "ccq", see DECISIONS; wint2 with code "hybrid" packs "ccq" with some layers at a
# different rate, `hybrid.py`).
METHOD_FORMATS = {"wint8": "q8", "wint4": "q4", "wint2": "ccq"}
CODES = ("ccq", "plain", "hybrid")
METHODS = tuple(METHOD_FORMATS)
# Columns per scale/offset pair, chosen by measured accuracy and speed (docs/DECISIONS.md,
# 2026-12-05): smaller groups cost memory (32 bits of fp16 scale and offset per group) and buy
# accuracy where the levels are few.
DEFAULT_GROUP_SIZES = {"wint8": 128, "wint4": 64, "wint2": 64}
GROUP_SIZES = (16, 32, 64, 128, 256)
# config.json's key for a quantized checkpoint (as Hugging Face names it).
CHECKPOINT_KEY = "quantization_config"


@dataclass(frozen=True)
class QuantizationConfig:
    """A validated weight-only quantization setting.

    `method`: wint8, wint4 or wint2. `group_size`: input columns sharing one scale and offset
    (None: the method's default). `lm_head`: also quantize the output projection (with tied
    embeddings, a quantized copy of the embedding matrix; lookups keep the full-precision one).
    Embeddings, norms, the MoE router gate and its bias always stay in full precision.
    """

    method: str
    group_size: int | None = None
    lm_head: bool = True
    # wint2's 2-bit code: "hybrid" (the default: the convolutional code with the LM head at 4 bits,
    # at no more bits a weight, `hybrid.py`), "ccq" (the code everywhere) or "plain" (plain
    # 2-bit); both kept for the comparison that chose "hybrid" (DECISIONS, 2026-12-06). Unset:
    # the method's default ("ccq" for wint8/wint4, where it means nothing).
    code: str | None = None

    def __post_init__(self) -> None:
        if self.code is None:
            object.__setattr__(self, "code", "hybrid" if self.method == "wint2" else "ccq")
        if self.method not in METHOD_FORMATS:
            raise ValueError(f"quantization.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g not in GROUP_SIZES):
            raise ValueError(
                f"quantization.group_size must be one of {', '.join(map(str, GROUP_SIZES))} (or unset for "
                f"the method's default), got {g!r}"
            )
        if not isinstance(self.lm_head, bool):
            raise ValueError(f"quantization.lm_head must be true or false, got {self.lm_head!r}")
        if self.code not in CODES or (self.code != "ccq" and self.method != "wint2"):
            raise ValueError(
                f"quantization.code must be one of {', '.join(CODES)}, and only applies to wint2; got "
                f"{self.code!r} for {self.method}"
            )

    @property
    def group(self) -> int:
        """The group size in force (the method's default when unset)."""
        return self.group_size or DEFAULT_GROUP_SIZES[self.method]

    @property
    def format(self) -> str:
        """The packed format of the quantized matrices (of most of them with code "hybrid")."""
        return "q2" if self.code == "plain" else METHOD_FORMATS[self.method]

    @classmethod
    def from_value(cls, value: Any) -> QuantizationConfig | None:
        """A scheme name ("wint4"), a JSON object or mapping of the fields, or None (no quantization)."""
        if value is None or isinstance(value, QuantizationConfig):
            return value
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"quantization: not a valid JSON object ({e})") from None
        if isinstance(value, str):
            return cls(method=value)
        if not isinstance(value, dict):
            raise ValueError(
                f"quantization must be one of {', '.join(METHODS)} or a mapping of method, group_size "
                f"and lm_head, got {value!r}"
            )
        known = ("method", "group_size", "lm_head", "code")
        unknown = [k for k in value if k not in known]
        if unknown:
            raise ValueError(f"quantization: unknown key {unknown[0]!r}; keys are {', '.join(known)}")
        if "method" not in value:
            raise ValueError(f"quantization: 'method' is required ({', '.join(METHODS)})")
        return cls(**value)

    def to_checkpoint(self) -> dict[str, Any]:
        """What a quantized checkpoint's config.json holds under `quantization_config`."""
        out = asdict(self)
        out["group_size"] = self.group
        out["format"] = self.format
        out["quant_method"] = "pdserve"
        return out

    @classmethod
    def from_checkpoint(cls, hf_config: dict[str, Any], where: str) -> QuantizationConfig | None:
        """The scheme a checkpoint's config.json declares (None: a full-precision checkpoint)."""
        raw = hf_config.get(CHECKPOINT_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict) or raw.get("quant_method") != "pdserve":
            raise ValueError(
                f"{where}: {CHECKPOINT_KEY} is not one pdserve wrote (quant_method 'pdserve'); serve the "
                "full-precision release and pass quantization to quantize it at load"
            )
        fields = {k: raw[k] for k in ("method", "group_size", "lm_head", "code") if k in raw}
        try:
            config = cls.from_value(fields)
        except ValueError as e:
            raise ValueError(f"{where}: {CHECKPOINT_KEY}: {e}") from None
        assert config is not None
        if raw.get("format") != config.format:
            raise ValueError(
                f"{where}: {CHECKPOINT_KEY}.format is {raw.get('format')!r}, but method "
                f"{config.method!r} packs {config.format!r}; the file was edited, re-run pdserve quantize"
            )
        return config
