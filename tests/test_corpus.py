"""The corpus stage: the real Wikipedia excerpt from the gensim wheel, user text files, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mintbuild import cli
from mintbuild.config import CorpusConfig
from mintbuild.errors import MintError
from mintbuild.io import sha256_file
from mintbuild.stages.corpus import build_corpus, wiki_to_text


def _articles(text: str) -> list[str]:
    return [block.strip("\n") for block in text.split("\n\n") if block.strip()]


# ---------------------------------------------------------------- the embedded Wikipedia excerpt


def test_about_a_hundred_articles_of_plain_text(corpus_dir: Path) -> None:
    meta = json.loads((corpus_dir / "meta.json").read_text())
    train = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    test = (corpus_dir / "test.txt").read_text(encoding="utf-8")
    n_train, n_test = len(_articles(train)), len(_articles(test))
    assert 95 <= n_train + n_test <= 115
    assert (n_train, n_test) == (meta["splits"]["train"]["documents"], meta["splits"]["test"]["documents"])
    assert 2_500_000 <= len(train) + len(test) <= 3_200_000
    for marker in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "'''", "&nbsp;", "<!--", "=="):
        assert marker not in train and marker not in test, marker
    assert "\n\n\n" not in train and not train.startswith("\n")


def test_articles_start_with_their_title_and_the_split_is_disjoint(corpus_dir: Path) -> None:
    meta = json.loads((corpus_dir / "meta.json").read_text())
    titles = {
        split: [a.split("\n", 1)[0] for a in _articles((corpus_dir / f"{split}.txt").read_text())]
        for split in ("train", "test")
    }
    assert titles["test"] == meta["test_titles"]
    assert not set(titles["train"]) & set(titles["test"])
    assert "Anarchism" in titles["train"] + titles["test"]
    assert "AccessibleComputing" not in titles["train"] + titles["test"]  # a redirect


def test_test_fraction_is_respected(corpus_dir: Path) -> None:
    meta = json.loads((corpus_dir / "meta.json").read_text())
    n_train, n_test = (meta["splits"][s]["documents"] for s in ("train", "test"))
    assert abs(n_test - 0.2 * (n_train + n_test)) <= 1


def test_meta_describes_the_files(corpus_dir: Path) -> None:
    meta = json.loads((corpus_dir / "meta.json").read_text())
    assert meta["source"] == "gensim_wiki" and meta["package"] == "gensim==4.4.0"
    assert len(meta["wheel_sha256"]) == 64
    for split in ("train", "test"):
        info = meta["splits"][split]
        text = (corpus_dir / info["file"]).read_text(encoding="utf-8")
        assert info["sha256"] == sha256_file(corpus_dir / info["file"])
        assert (info["chars"], info["bytes"]) == (len(text), len(text.encode("utf-8")))


def test_rebuild_is_byte_identical(corpus_dir: Path, tmp_path: Path) -> None:
    build_corpus(CorpusConfig(), tmp_path / "again")
    for name in ("train.txt", "test.txt", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (corpus_dir / name).read_bytes(), name


def test_seed_and_fraction_change_the_split(corpus_dir: Path, tmp_path: Path) -> None:
    base = json.loads((corpus_dir / "meta.json").read_text())
    other = build_corpus(CorpusConfig(seed=1), tmp_path / "seed1")
    assert set(other["test_titles"]) != set(base["test_titles"])
    half = build_corpus(CorpusConfig(test_fraction=0.5), tmp_path / "half")
    n = half["splits"]["train"]["documents"] + half["splits"]["test"]["documents"]
    assert abs(half["splits"]["test"]["documents"] - n / 2) <= 1
    # Hash-ranked: the test set at 0.2 is contained in the test set at 0.5 (same seed).
    assert set(base["test_titles"]) <= set(half["test_titles"])


# ---------------------------------------------------------------- the markup stripper on known cases


@pytest.mark.parametrize(
    ("wiki", "text"),
    [
        ("'''Bold''' and ''italic''", "Bold and italic"),
        ("[[Paris]] and [[Paris, Texas|the other one]]", "Paris and the other one"),
        ("A{{cite|x={{nested|y}}}}B", "AB"),
        ("x<ref name=a>{{cite web|url=http://a}}</ref> y<ref name=a/>.", "x y."),
        ("see [http://example.org the site] now", "see the site now"),
        ("[[File:A.jpg|thumb|A [[caption]] [here]]]Text[[Category:Foo]][[de:Paris]]", "Text"),
        ("== History ==\n* one\n# two", "History\none\ntwo"),
        ("{|\n|-\n| a || b\n|}\nAfter", "After"),
        ("a<!-- hidden -->b &amp; c&nbsp;d", "ab & c d"),
        ("Intro\n== References ==\n{{reflist}}\n* ref\n== History ==\nKept", "Intro\nHistory\nKept"),
        ("Aristotle ({{lang|grc|x}}; 384 BC)", "Aristotle (384 BC)"),
    ],
)
def test_wiki_to_text(wiki: str, text: str) -> None:
    assert wiki_to_text(wiki) == text


# ---------------------------------------------------------------- source=text_file


def test_text_file_splits_documents(tmp_path: Path) -> None:
    src = tmp_path / "mine.txt"
    docs = [f"Document {i}\nline two of {i}" for i in range(10)]
    src.write_text("\r\n\r\n".join(d.replace("\n", "\r\n") for d in docs) + "\r\n", encoding="utf-8")
    cfg = CorpusConfig(source="text_file", path=str(src), test_fraction=0.3)
    meta = build_corpus(cfg, tmp_path / "out")
    train = _articles((tmp_path / "out" / "train.txt").read_text())
    test = _articles((tmp_path / "out" / "test.txt").read_text())
    assert len(test) == 3 and len(train) == 7
    assert sorted(train + test) == sorted(docs)
    assert meta["test_titles"] == [d.split("\n")[0] for d in test]
    build_corpus(cfg, tmp_path / "again")
    assert (tmp_path / "again" / "test.txt").read_bytes() == (tmp_path / "out" / "test.txt").read_bytes()


def test_wikitext_folder_keeps_its_split(tmp_path: Path) -> None:
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    test = (
        " \n = Robert Boulter = \n \n Robert Boulter is an English actor .\n"
        " \n = Du Fu = \n \n Du Fu was a poet .\n"
    )
    (folder / "wiki.test.raw").write_text(test, encoding="utf-8")
    (folder / "wiki.train.raw").write_text(" \n = Valkyria = \n \n Senjō no Valkyria .\n", encoding="utf-8")
    meta = build_corpus(CorpusConfig(source="text_file", path=str(folder)), tmp_path / "out")
    assert (tmp_path / "out" / "test.txt").read_text(encoding="utf-8") == test
    assert meta["test_titles"] == ["Robert Boulter", "Du Fu"]
    assert meta["splits"]["train"]["documents"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"  \n\n \n", "is empty"),
        (b"ok\n\n\xff\xfe bad", "not UTF-8 text"),
        (b"one document only\nno blank line", "at least 2"),
    ],
    ids=["missing", "empty", "blank", "not-utf8", "one-doc"],
)
def test_bad_text_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    src = tmp_path / "input.txt"
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(MintError, match=f"input.txt: .*{message}"):
        build_corpus(CorpusConfig(source="text_file", path=str(src)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_config(tmp_path: Path) -> None:
    with pytest.raises(MintError, match=r"corpus.path is not set"):
        build_corpus(CorpusConfig(source="text_file"), tmp_path / "out")
    with pytest.raises(MintError, match=r"corpus.source 'hub'"):
        build_corpus(CorpusConfig(source="hub"), tmp_path / "out")
    with pytest.raises(MintError, match=r"test_fraction 1.0"):
        build_corpus(CorpusConfig(test_fraction=1.0), tmp_path / "out")
    with pytest.raises(MintError, match=r"has no member nope.bz2"):
        build_corpus(CorpusConfig(wheel_member="nope.bz2"), tmp_path / "out")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(MintError, match=r"emptydir: a corpus folder needs wiki.test.raw"):
        build_corpus(CorpusConfig(source="text_file", path=str(tmp_path / "emptydir")), tmp_path / "out")


def test_cli_reports_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        f"corpus:\n  source: text_file\n  path: {tmp_path / 'nope.txt'}\n  out: {tmp_path / 'o'}\n"
    )
    assert cli.main(["corpus", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mintbuild corpus: error: ") and "nope.txt" in err[-1]
