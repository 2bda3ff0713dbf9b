"""Concept vocabularies of CLIP-Dissect: a file of concepts, or the default list of frequent English words."""

from __future__ import annotations

import logging
import os

from .constants import DEFAULT_VOCABULARY_SIZE

logger = logging.getLogger(__name__)


def load_concepts(path: str | os.PathLike) -> list[str]:
    """Concepts from a UTF-8 text file, one per line; blank lines and repeats are dropped (logged), the order is
    kept."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save the concept file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)."
        ) from error
    concepts = list(dict.fromkeys(lines))
    if not concepts:
        raise ValueError(f"{path} holds no concepts; write one concept per line.")
    if len(concepts) < len(lines):
        repeated = sorted({c for c in lines if lines.count(c) > 1})
        logger.warning(
            "%s lists %d concepts more than once (%s); each is kept once.",
            path,
            len(repeated),
            ", ".join(repeated[:5]) + (", …" if len(repeated) > 5 else ""),
        )
    return concepts


def default_vocabulary(size: int = DEFAULT_VOCABULARY_SIZE) -> list[str]:
    """The `size` most frequent English words of `wordfreq` that are alphabetic and at least 3 letters long.

    Like CLIP-Dissect's default list (``data/20k.txt`` of its repository, 20,000 words) it holds every part of
    speech; unlike it, it leaves out words of one or two letters (596 of that list: "a", "to", "tv", …). The two
    20,000-word lists share 15,765 words. To use the authors' list, pass it as a concept file (``--concepts``).
    """
    try:
        from wordfreq import top_n_list
    except ImportError as error:
        raise ImportError(
            "The default concept vocabulary needs wordfreq: pip install 'hf_clip_aft[dissect]', or pass --concepts "
            "with a file of concepts (one per line)."
        ) from error
    # wordfreq's English list holds ~1/4 short or non-alphabetic tokens; 2x headroom covers them.
    words = [w for w in top_n_list("en", 2 * size + 1000) if w.isalpha() and len(w) >= 3]
    if len(words) < size:
        raise ValueError(f"wordfreq offers only {len(words)} English words that qualify; ask for fewer than {size}.")
    return words[:size]
