"""Key maps between kinema / original AnimateDiff motion-module names and diffusers' MotionAdapter names.

kinema's motion modules use the original AnimateDiff names, so the original layout needs no map; diffusers drops
the `temporal_transformer.` level and renames the attentions and norms. The maps are data: ordered regex rules,
applied per key, each rule written once for both directions.
"""

from __future__ import annotations

import re

# (original / kinema pattern, diffusers pattern) with named groups shared by both sides.
_RULES: list[tuple[str, str]] = [
    (r"(?P<pre>.*\.motion_modules\.\d+\.)temporal_transformer\.(?P<rest>.*)", r"\g<pre>\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)attention_blocks\.0\.(?P<rest>.*)", r"\g<pre>attn1.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)attention_blocks\.1\.(?P<rest>.*)", r"\g<pre>attn2.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norms\.0\.(?P<rest>.*)", r"\g<pre>norm1.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norms\.1\.(?P<rest>.*)", r"\g<pre>norm2.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)ff_norm\.(?P<rest>.*)", r"\g<pre>norm3.\g<rest>"),
]
_REVERSE: list[tuple[str, str]] = [
    (r"(?P<pre>.*\.motion_modules\.\d+\.)(?P<rest>(?!temporal_transformer\.).*)",
     r"\g<pre>temporal_transformer.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)attn1\.(?P<rest>.*)", r"\g<pre>attention_blocks.0.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)attn2\.(?P<rest>.*)", r"\g<pre>attention_blocks.1.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norm1\.(?P<rest>.*)", r"\g<pre>norms.0.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norm2\.(?P<rest>.*)", r"\g<pre>norms.1.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norm3\.(?P<rest>.*)", r"\g<pre>ff_norm.\g<rest>"),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    if ".motion_modules." not in key:  # the 2D UNet's own names are the same in both layouts
        return key
    for pattern, replacement in rules:
        key = re.sub(f"^{pattern}$", replacement, key)
    return key


def original_to_diffusers_key(key: str) -> str:
    """`down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`
    -> `down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight`."""
    return _rename(key, _RULES)


def diffusers_to_original_key(key: str) -> str:
    """Inverse of `original_to_diffusers_key`."""
    return _rename(key, _REVERSE)
