"""Build the text corpus the evaluator measures perplexity on: `train.txt`, `test.txt`, `meta.json`.

source=gensim_wiki (the embedded default): the gensim wheel carries a real English Wikipedia dump excerpt
(~100 articles). We read it straight from the wheel (no install), strip the wiki markup to plain text and
split whole articles deterministically (by a seeded hash of the title, so adding an article never moves
another one across the split).

source=text_file: a user's UTF-8 file split on blank-line separated documents the same way, or a folder
holding a WikiText copy (wiki.test.raw / wiki.train.raw, or the .tokens files), whose official split is kept.

File layout: one paragraph per line; documents separated by one blank line; for Wikipedia each article
starts with its title line. Output bytes depend only on the input and the config.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import logging
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mintbuild.config import CorpusConfig, load_params
from mintbuild.errors import MintError
from mintbuild.io import atomic_dir, atomic_write_json, atomic_write_text, sha256_file, sha256_text
from mintbuild.wheels import fetch_wheel

META_SCHEMA = 1
SPLITS = ("train", "test")
#: WikiText file names, preferred first (raw keeps the original tokens; .tokens has <unk>).
WIKITEXT = {"test": ("wiki.test.raw", "wiki.test.tokens"), "train": ("wiki.train.raw", "wiki.train.tokens")}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    title: str
    #: Paragraphs, one per line; for an article the first line is its title.
    text: str
    #: What the split hashes: the title of an article, the whole text of a plain document.
    key: str


# ---------------------------------------------------------------- the stage


def build_corpus(cfg: CorpusConfig, out: Path) -> dict[str, Any]:
    """Write `out/train.txt`, `out/test.txt` and `out/meta.json`; return the meta."""
    out = Path(out)
    if cfg.source == "gensim_wiki":
        return _build_gensim_wiki(cfg, out)
    if cfg.source == "text_file":
        return _build_text_file(cfg, out)
    raise MintError(f"corpus.source {cfg.source!r} is not one of: gensim_wiki, text_file")


def _build_gensim_wiki(cfg: CorpusConfig, out: Path) -> dict[str, Any]:
    _check_fraction(cfg.test_fraction)
    wheel = fetch_wheel(cfg.package)
    stats: dict[str, int] = {}
    docs = list(read_wiki_dump(wheel, cfg.wheel_member, stats))
    if len(docs) < 2:
        raise MintError(f"{wheel}!{cfg.wheel_member}: only {len(docs)} article(s) with text")
    log.info("extracted %d articles (%s)", len(docs), ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    train, test = split_documents(docs, cfg.test_fraction, cfg.seed)
    source = {
        "source": "gensim_wiki",
        "package": cfg.package,
        "wheel": wheel.name,
        "wheel_sha256": sha256_file(wheel),
        "member": cfg.wheel_member,
        "skipped": stats,
        "split": {"by": "sha256(seed, title)", "seed": cfg.seed, "test_fraction": cfg.test_fraction},
    }
    texts = {"train": join_documents(train), "test": join_documents(test)}
    counts = {"train": len(train), "test": len(test)}
    return _write(out, texts, counts, [d.title for d in test], source)


def _build_text_file(cfg: CorpusConfig, out: Path) -> dict[str, Any]:
    if not cfg.path:
        raise MintError("corpus.source is 'text_file' but corpus.path is not set")
    path = Path(cfg.path).expanduser().resolve()
    if path.is_dir():
        return _build_wikitext_dir(path, out)
    text = read_utf8(path)
    _check_fraction(cfg.test_fraction)
    docs = split_plain_text(text)
    if len(docs) < 2:
        raise MintError(
            f"{path}: {len(docs)} document(s); a test split needs at least 2 separated by a blank line"
        )
    train, test = split_documents(docs, cfg.test_fraction, cfg.seed)
    source = {
        "source": "text_file",
        "path": str(path),
        "input_sha256": sha256_file(path),
        "split": {"by": "sha256(seed, document)", "seed": cfg.seed, "test_fraction": cfg.test_fraction},
    }
    texts = {"train": join_documents(train), "test": join_documents(test)}
    counts = {"train": len(train), "test": len(test)}
    return _write(out, texts, counts, [d.title for d in test], source)


def _build_wikitext_dir(folder: Path, out: Path) -> dict[str, Any]:
    """A local WikiText copy: keep its official split and its bytes as they are."""
    files = {
        split: next((folder / n for n in names if (folder / n).is_file()), None)
        for split, names in WIKITEXT.items()
    }
    if files["test"] is None:
        raise MintError(f"{folder}: a corpus folder needs {' or '.join(WIKITEXT['test'])}")
    if files["train"] is None:
        log.warning("%s: no wiki.train.*; train.txt will be empty", folder)
    texts = {split: read_utf8(p) if p else "" for split, p in files.items()}
    counts = {split: len(wikitext_titles(t)) for split, t in texts.items()}
    source = {
        "source": "text_file",
        "path": str(folder),
        "files": {split: p.name for split, p in files.items() if p},
        "input_sha256": {split: sha256_file(p) for split, p in files.items() if p},
        "split": {"by": "wikitext files"},
    }
    return _write(out, texts, counts, wikitext_titles(texts["test"]), source)


def _write(
    out: Path, texts: dict[str, str], counts: dict[str, int], test_titles: list[str], source: dict[str, Any]
) -> dict[str, Any]:
    with atomic_dir(out) as dst:
        splits = {}
        for split in SPLITS:
            atomic_write_text(dst / f"{split}.txt", texts[split])
            data = texts[split]
            splits[split] = {
                "file": f"{split}.txt",
                "documents": counts[split],
                "chars": len(data),
                "bytes": len(data.encode("utf-8")),
                "sha256": sha256_text(data),
            }
        meta = {"schema_version": META_SCHEMA, **source, "splits": splits, "test_titles": test_titles}
        atomic_write_json(dst / "meta.json", meta)
    log.info(
        "corpus in %s: train %d docs / %d chars, test %d docs / %d chars",
        out,
        splits["train"]["documents"],
        splits["train"]["chars"],
        splits["test"]["documents"],
        splits["test"]["chars"],
    )
    return meta


def _check_fraction(f: float) -> None:
    if not 0.0 < f < 1.0:
        raise MintError(f"corpus.test_fraction {f} must be strictly between 0 and 1")


# ---------------------------------------------------------------- splitting and files


def split_documents(
    docs: list[Document], test_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Deterministic split: the round(n * f) documents with the smallest sha256(seed, key) are the test set.

    Hashing each key (instead of shuffling the list) keeps a document's side fixed when others are added or
    removed. Both splits keep the input order.
    """
    n = len(docs)
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    ranked = sorted(range(n), key=lambda i: (hashlib.sha256(f"{seed}\0{docs[i].key}".encode()).digest(), i))
    test_ids = set(ranked[:n_test])
    return [d for i, d in enumerate(docs) if i not in test_ids], [
        d for i, d in enumerate(docs) if i in test_ids
    ]


def join_documents(docs: list[Document]) -> str:
    return "".join(d.text + "\n\n" for d in docs).removesuffix("\n")


def read_utf8(path: Path) -> str:
    """A user's text file as str with \\n line ends; missing, empty or non-UTF-8 is a MintError."""
    if not path.is_file():
        raise MintError(f"{path}: corpus file does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise MintError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise MintError(f"{path}: corpus file is empty")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_plain_text(text: str) -> list[Document]:
    """Blank-line separated documents, each titled by (the start of) its first line."""
    docs = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n") if ln.strip()]
        if lines:
            body = "\n".join(lines)
            docs.append(Document(title=lines[0].strip()[:80], text=body, key=body))
    return docs


_WIKITEXT_TITLE = re.compile(r"^ = (?!=)(.+?) = $", re.M)


def wikitext_titles(text: str) -> list[str]:
    return _WIKITEXT_TITLE.findall(text)


# ---------------------------------------------------------------- MediaWiki dump


def read_wiki_dump(wheel: Path, member: str, stats: dict[str, int]) -> Iterator[Document]:
    """Plain-text articles (namespace 0, not redirects) of a bz2 MediaWiki XML dump inside a wheel."""
    for key in ("redirects", "other_namespaces", "empty"):
        stats[key] = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as raw, bz2.open(raw) as xml:
            for title, ns, redirect, wikitext in _iter_pages(xml):
                if ns != "0":
                    stats["other_namespaces"] += 1
                elif redirect or re.match(r"\s*#redirect", wikitext, re.I):
                    stats["redirects"] += 1
                elif body := wiki_to_text(wikitext):
                    yield Document(title=title, text=f"{title}\n{body}", key=title)
                else:
                    stats["empty"] += 1
    except KeyError:
        raise MintError(f"{wheel}: has no member {member}") from None
    except (zipfile.BadZipFile, OSError, EOFError, ET.ParseError) as e:
        raise MintError(f"{wheel}!{member}: cannot read the dump ({e})") from None


def _iter_pages(xml: Any) -> Iterator[tuple[str, str, bool, str]]:
    for _, elem in ET.iterparse(xml, events=("end",)):
        if _local(elem.tag) != "page":
            continue
        fields: dict[str, str] = {}
        redirect = False
        for child in elem.iter():
            name = _local(child.tag)
            if name == "redirect":
                redirect = True
            elif name in ("title", "ns", "text") and name not in fields:
                fields[name] = child.text or ""
        yield fields.get("title", ""), fields.get("ns", "0"), redirect, fields.get("text", "")
        elem.clear()  # keep memory flat on a large dump


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# ---------------------------------------------------------------- wiki markup -> plain text

#: Sections made of citations and link lists, not prose.
_DROP_SECTIONS = {
    "references",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "see also",
    "external links",
    "further reading",
    "notes and references",
    "references and notes",
    "works cited",
    "external sources",
}
#: Link namespaces whose links are media or page metadata, not words of the text.
_DROP_NAMESPACES = {"file", "image", "media", "category"}
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$|^simple$")

_HEADING = re.compile(r"^[ \t]*(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*$")
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
# Tags whose content is not prose (formulas, galleries, code); other tags are removed and their text kept.
_DROP_BLOCKS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|ce|hiero|graph|mapframe|references)"
    r"\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
# Innermost-first: a template holding no other "{{", so repeated removal handles any nesting depth.
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{)[^}]|\}(?!\}))*\}\}")
_TABLE = re.compile(r"^[ \t:]*\{\|(?:(?!^[ \t:]*\{\|)[\s\S])*?^[ \t]*\|\}", re.M)
# Innermost-first like templates; single brackets may occur inside (a caption's "[above]"), and in "]]]"
# the first "]" is content.
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\])|\](?=\]\]))*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:[ \t]+([^\]]*))?\]")
_QUOTES = re.compile(r"'{2,}")
_LIST = re.compile(r"^[*#:;]+[ \t]*", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\([\s,;:]*\)")
# "(;, Aristotélēs; 384–322 BC)": separators left behind by removed pronunciation/language templates.
_PARENS_LEAD = re.compile(r"\([\s,;:]+")
_PARENS_TRAIL = re.compile(r"[\s,;:]+\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)\]])")
_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}")


def wiki_to_text(wikitext: str) -> str:
    """Plain text of one article: paragraphs and headings one per line, no markup."""
    text = _COMMENT.sub("", wikitext)
    text = _drop_sections(text)
    text = _REF.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _repeat(_TEMPLATE, "", text)
    text = _repeat(_TABLE, "", text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _repeat(_LINK, _link_text, text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = _LIST.sub("", text)
    text = html.unescape(text)
    lines = (_clean_line(ln) for ln in text.split("\n"))
    return "\n".join(ln for ln in lines if ln)


def _repeat(pattern: re.Pattern[str], repl: Any, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _drop_sections(text: str) -> str:
    kept: list[str] = []
    skip_level = 0  # >0 while inside a dropped section of that heading level
    for line in text.split("\n"):
        m = _HEADING.match(line)
        if m:
            level = len(m.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = level if _QUOTES.sub("", m.group(2)).strip().lower() in _DROP_SECTIONS else 0
            line = m.group(2)  # a heading becomes a line of its own
        if not skip_level:
            kept.append(line)
    return "\n".join(kept)


def _link_text(m: re.Match[str]) -> str:
    """[[target]] -> target, [[target|label]] -> label; media, category and language links -> ''."""
    inner = m.group(1)
    target, pipe, _ = inner.partition("|")
    target = target.strip()
    label = inner.rsplit("|", 1)[1].strip() if pipe else ""
    if target.startswith(":"):  # [[:Category:X]] is a visible link, not a categorisation
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip()
        if prefix.lower() in _DROP_NAMESPACES or _INTERLANGUAGE.match(prefix):
            return ""
    if label:
        return label
    if pipe:  # the "pipe trick": [[Paris, Texas|]] shows "Paris"
        return re.sub(r"\s*\(.*\)$|,.*$", "", target.split(":", 1)[-1])
    return target


def _clean_line(line: str) -> str:
    line = line.replace("\u00a0", " ")
    if line.lstrip().startswith(("|", "!", "{|")):  # rows of a table whose markup was broken
        return ""
    line = _LEFTOVER.sub("", line)
    line = _EMPTY_PARENS.sub("", line)
    line = _PARENS_TRAIL.sub(")", _PARENS_LEAD.sub("(", line))
    line = re.sub(r"[ \t]+", " ", line).strip()
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line).replace("( ", "(")
    return line if re.search(r"\w", line) else ""


# ---------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    build_corpus(params.corpus, Path(params.corpus.out))
