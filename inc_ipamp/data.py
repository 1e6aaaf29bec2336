"""Calibration and evaluation text that ships with a package (gensim's test data), no download.

Documents are split by index parity *before* tokenisation, so calibration and evaluation never share
a document, and the token blocks are cut per split, so they never share a token either.
"""

from __future__ import annotations

import bz2
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import DataError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILES = ("lee_background.cor", "lee.cor")


def _gensim_test_data() -> Path:
    try:
        import gensim
    except ImportError:
        raise DataError("the default data needs gensim (pip install gensim)") from None
    return Path(os.path.dirname(gensim.__file__)) / "test" / "test_data"


@lru_cache(maxsize=1)
def wiki_documents(min_chars: int = 500) -> tuple[str, ...]:
    """Plain text of the article pages of gensim's shortened English Wikipedia dump, in file order."""
    from gensim.corpora.wikicorpus import filter_wiki

    path = _gensim_test_data() / WIKI_FILE
    if not path.exists():
        raise DataError(f"gensim's Wikipedia sample is missing: {path}")
    docs = []
    with bz2.open(path, "rb") as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns = el.find("{*}ns")
            text = el.find("{*}revision/{*}text")
            if ns is not None and ns.text == "0" and text is not None and text.text:
                raw = text.text
                if not raw.lstrip().upper().startswith("#REDIRECT"):
                    clean = _tidy(filter_wiki(raw))
                    if len(clean) >= min_chars:
                        docs.append(clean)
            el.clear()
    return tuple(docs)


def _tidy(text: str) -> str:
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"\n{2,}", "\n", text)
    text = re.sub(r"[ \t]+", " ", text)
    lines = [ln.strip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if len(ln) > 30 or ln.endswith("."))


@lru_cache(maxsize=1)
def lee_documents() -> tuple[str, ...]:
    """The Lee news corpus (Australian news articles, one per line)."""
    d = _gensim_test_data()
    docs: list[str] = []
    for name in LEE_FILES:
        p = d / name
        if p.exists():
            docs.extend(ln.strip() for ln in p.read_text(encoding="latin-1").splitlines() if ln.strip())
    if not docs:
        raise DataError(f"gensim's Lee corpus is missing under {d}")
    return tuple(docs)


def split_documents(docs: tuple[str, ...] | list[str], split: str) -> list[str]:
    """Deterministic disjoint split: even-indexed documents calibrate, odd-indexed evaluate.

    Duplicates are dropped first (the Lee corpus repeats articles), or one text could land in both splits."""
    docs = list(dict.fromkeys(docs))
    if split == "calibration":
        return list(docs[0::2])
    if split == "evaluation":
        return list(docs[1::2])
    raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")


def text_file_documents(path: str | Path) -> list[str]:
    """User data: a UTF-8 text file, documents separated by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (invalid byte {raw[e.start:e.start + 1]!r} at offset "
                        f"{e.start}); give a plain text file, documents separated by blank lines") from None
    if "\x00" in text:
        raise DataError(f"data file {path} contains NUL bytes: it looks binary, not text")
    docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"data file {path} contains no text")
    return docs


@dataclass
class TokenBlocks:
    """Fixed-length token blocks (n, seq_len), plus where they came from for the record."""

    ids: torch.Tensor
    source: str
    split: str

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self.ids[i : i + 1]


def token_blocks(tokenizer, docs: list[str], n_blocks: int, seq_len: int, source: str = "",
                 split: str = "") -> TokenBlocks:
    """``n_blocks`` blocks of ``seq_len`` tokens spread over the documents: the first block of each of the first
    ``n_blocks`` documents, then (if the data has fewer) the second block of each, and so on. A document shorter
    than a block is joined to the next ones (EOS between) until the unit fills one.

    Why not consecutive blocks of one stream: the default data's documents are whole Wikipedia articles, and its
    calibration split's first 32×256 tokens were all one article ("Anarchism"), its first 48×256 evaluation tokens
    three; sums that treat the sequences as independent samples (the loss model's standard errors, its type-level
    curvature) then describe one topic, and a held-out check compares one article with another. Tokenises only as
    many documents as the blocks need (all of them if they hold fewer than ``n_blocks`` units), so long corpora cost
    nothing extra.
    """
    if n_blocks < 1 or seq_len < 2:
        raise DataError(f"need at least 1 block of at least 2 tokens (got {n_blocks} x {seq_len})")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    units: list[list[int]] = []
    cur: list[int] = []
    for doc in docs:
        cur.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        cur.append(eos)
        if len(cur) >= seq_len:
            units.append(cur)
            cur = []
            if len(units) >= n_blocks:
                break
    rows: list[list[int]] = []
    for k in range(max((len(u) // seq_len for u in units), default=0)):  # k-th block of every unit that has one
        if len(rows) >= n_blocks:
            break
        rows.extend(u[k * seq_len:(k + 1) * seq_len] for u in units if len(u) >= (k + 1) * seq_len)
    if len(rows) < n_blocks:
        if not rows:
            raise DataError(f"the {split or 'given'} data has {len(cur)} tokens, fewer than one block of {seq_len}")
        raise DataError(f"the {split or 'given'} data yields only {len(rows)} blocks of {seq_len} tokens, "
                        f"{n_blocks} asked")
    return TokenBlocks(torch.tensor(rows[:n_blocks], dtype=torch.long), source, split)


def load_blocks(tokenizer, split: str, n_blocks: int, seq_len: int, data: str | None = None) -> TokenBlocks:
    """Default data (gensim's Wikipedia sample) or a user text file, split disjointly."""
    if data in (None, "", "default", "wiki"):
        docs, source = wiki_documents(), "gensim:enwiki-shortened"
    elif data == "lee":
        docs, source = lee_documents(), "gensim:lee"
    else:
        docs, source = tuple(text_file_documents(data)), str(data)
    if len(docs) < 2:
        raise DataError(f"{source} has {len(docs)} document(s); at least 2 are needed for disjoint splits")
    return token_blocks(tokenizer, split_documents(docs, split), n_blocks, seq_len, source, split)
