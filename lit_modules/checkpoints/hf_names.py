"""Tensor-name templates shared by the Hugging Face conversions (hf.py and the family
modules beside it): a rule pairs an HF name template with ours, `{slot}` standing for
the alternatives of SLOTS (layer index, projection names, ...), and `rename` maps a name
either way by the first rule that matches it."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import List, Optional, Tuple

SLOTS = {
    "i": r"\d+", "proj": "q_proj|k_proj|v_proj|o_proj", "wb": "weight|bias", "qk": "q_norm|k_norm",
    "mlp": "gate_proj|up_proj|down_proj",
    # DeepSeek-V3's latent attention
    "mla": "q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj", "mlanorm": "q_a_layernorm|kv_a_layernorm",
    # Qwen3-Next / Qwen3.5's gated DeltaNet
    "lin": "in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|conv1d|norm|out_proj", "ssm": "A_log|dt_bias",
    # Gemma 4's router
    "rs": "scale|per_expert_scale",
}


@lru_cache(maxsize=None)
def compile_template(template: str) -> re.Pattern:
    out = re.escape(template)
    for slot, alts in SLOTS.items():
        out = out.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{alts})")
    return re.compile(out + "$")


def rename(rules: List[Tuple[str, str]], name: str, forward: bool) -> Optional[str]:
    """`name` under the first rule whose HF side (forward) or our side (backward)
    matches it, or None."""
    for hf, ours in rules:
        src, dst = (hf, ours) if forward else (ours, hf)
        m = compile_template(src).match(name)
        if m:
            return dst.format(**m.groupdict())
    return None
