"""eval/corpus.py's conversion of documentation markup to prose, paragraph dedup and the held-out split (the
download itself needs Debian's package registry: run `python -m eval.corpus --out DIR` by hand)."""
from eval import corpus


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
