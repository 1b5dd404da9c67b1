"""English prose outside the SAE training corpus, available offline: the second text distribution of notebook 05's
SAE quality table.

    docs = python_reference_prose()                 # ~70 documents of running English text
    corpus = prose_corpus("python-reference")       # a Corpus (BOS per window, EOS between documents)

``python-reference``: the topic texts of the Python language reference that ship with every CPython
(``pydoc_data.topics``, the text ``help("class")`` prints), reduced to their running prose: indented blocks (code
examples, grammar rules, tables) and lines with a prompt (``>>>``) are dropped, the lines of a paragraph are
joined, and a topic with less than ``MIN_CHARS`` characters of prose left is dropped; one topic is one document.
It is technical English written by people, not chat: neither ShareGPT messages nor counting prompts. The text is
the interpreter's own, so a run is reproducible for a Python version (the study records it).
"""

from __future__ import annotations

import platform
import re

from pydoc_data.topics import topics as _PYDOC_TOPICS

from workbench.data.corpus import Corpus

PROSE_CORPORA = ("python-reference",)
MIN_CHARS = 400  # a document keeps at least this many characters of prose
_HEADING_RULE = re.compile(r"^[*=\-~^\"]{3,}$")


def _prose_paragraphs(text: str) -> list[str]:
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        if line[:1].isspace() or ">>>" in line or _HEADING_RULE.match(line.strip()):
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        current.append(line.strip())
    # a paragraph of running text: several words and a full stop (headings and fragments such as "is equivalent
    # to" before a dropped code block are left out)
    return [p for p in paragraphs if len(p.split()) >= 8 and "." in p]


def python_reference_prose(min_chars: int = MIN_CHARS) -> list[str]:
    """The documents of ``python-reference`` (see the module docstring), in topic-name order, duplicates dropped."""
    docs, seen = [], set()
    for name in sorted(_PYDOC_TOPICS):
        doc = "\n\n".join(_prose_paragraphs(_PYDOC_TOPICS[name]))
        if len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


def prose_corpus(name: str = "python-reference") -> Corpus:
    """The prose corpus ``name`` (one of :data:`PROSE_CORPORA`) as a :class:`~workbench.data.corpus.Corpus`."""
    if name not in PROSE_CORPORA:
        raise ValueError(f"unknown prose corpus {name!r}; known: {list(PROSE_CORPORA)}")
    return Corpus(python_reference_prose())


def prose_source(name: str = "python-reference") -> str:
    """Where the text of ``name`` comes from (recorded with the metrics)."""
    return f"pydoc_data.topics of Python {platform.python_version()}"
