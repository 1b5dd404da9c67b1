"""Checks and labels every figure helper shares: a frame with the columns a figure needs, tokens as shown."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

# Byte-level BPE marks (GPT-2 style) -> readable text.
_BPE_MARKS = {"Ġ": "␣", "Ċ": "↵", "ĉ": "⇥", "▁": "␣"}


def display_token(token) -> str:
    """A token string as shown in figures: leading-space/newline marks made visible, HTML-escaped for plotly."""
    if token is None or (isinstance(token, float) and np.isnan(token)):
        return ""
    text = str(token)
    for mark, shown in _BPE_MARKS.items():
        text = text.replace(mark, shown)
    return html.escape(text, quote=False)


def check_frame(df, required: Sequence[str], what: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} needs a pandas DataFrame (e.g. from workbench.logit_lens), got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what}: the frame lacks column(s) {missing}; it needs {list(required)} "
            f"(the columns of workbench.logit_lens), it has {list(df.columns)}"
        )
    if df.empty:
        raise ValueError(f"{what}: the frame is empty")
    return df
