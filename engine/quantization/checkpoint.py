"""`pdserve quantize`: a quantized checkpoint that later loads without re-quantizing.

The directory holds the packed tensors under the layers' names (`X.weight_packed`, `X.weight_scale`,
`X.weight_offset`, see `Linear.quantize`), every full-precision tensor as loaded, config.json with
a `quantization_config` (`QuantizationConfig.to_checkpoint`), and the tokenizer and generation
files of the source. Loading it builds the model with packed storage from that config and copies
name for name, so the loader's header checks name any tensor that does not match the config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pdserve.engine.engine import Engine
from pdserve.engine.loader import save_sharded
from pdserve.engine.quantization.apply import quantized_bytes
from pdserve.engine.quantization.config import CHECKPOINT_KEY

# Files copied beside the weights when the source has them.
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json")  # fmt: skip


def write_quantized_checkpoint(engine: Engine, out: Path) -> dict[str, int]:
    """Writes `engine`'s quantized model to directory `out` (created; must be empty or absent).
    Returns the packed and fp32 bytes of the quantized layers."""
    if engine.quantization is None:
        raise ValueError("quantization: pass a scheme (wint8, wint4, wint2) to write a quantized checkpoint")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; pick a new directory for the quantized checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    config = dict(engine.source.hf_config)
    config.update(engine.config.hf_overrides)
    config[CHECKPOINT_KEY] = engine.quantization.to_checkpoint()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_sharded(engine.model.state_dict(), out)
    if engine.source.path is not None:
        for name in _SIDE_FILES:
            if (engine.source.path / name).is_file():
                shutil.copy(engine.source.path / name, out / name)
    packed, full = quantized_bytes(engine.model)
    return {"packed_bytes": packed, "fp32_bytes": full}
