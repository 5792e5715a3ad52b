"""Built-in offline corpora: Python standard-library code and English prose.

The offline demo and the tests need two clearly different text sources that
every Python installation has, without the Hugging Face hub:

- ``builtin:stdlib-code``: the standard library's ``.py`` sources with
  docstrings and comments removed and English message strings emptied, one
  document per top-level definition;
- ``builtin:stdlib-prose``: only the plain-English sentences of the docstrings,
  the comment blocks and ``pydoc_data.topics``: indented examples, doctests,
  headings, lists and any sentence naming an identifier or holding markup are
  dropped. The two corpora share as little as possible besides English words,
  which is what lets a small model keep them apart (measured in the README's
  demo frontier).

Both come from a single pass over the sources in sorted file order (``ast``
finds the docstrings, a string-aware scan drops the comments), so they are
deterministic for a given Python version. They are built once per process.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import inspect
import logging
import os
import re
import sysconfig
import textwrap
import time

logger = logging.getLogger(__name__)

from .specs import BUILTIN_CORPORA, BUILTIN_PREFIX  # noqa: E402,F401 - one list of names

# Tests, GUI code, the 2to3 grammar tool, third-party packages, generated data
# tables (``encodings``) and the topic texts (``pydoc_data``, used as prose)
# are not representative hand-written library code.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "ensurepip",
    }
)
_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_MIN_PROSE_CHARS = 150
_MIN_LETTER_FRACTION = 0.75  # of the non-blank characters
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.(\s|$))")
# A string literal (kept) or a comment (dropped). In valid Python a quote or a
# ``#`` outside any string starts a string or a comment, so a left-to-right scan
# pairs them correctly (string prefixes need no care: ``\`` escapes a quote in
# raw strings too). PEP 701 f-strings reusing their own quote are the rare
# exception: at worst a comment survives or a line is cut short.
_STRING_OR_COMMENT = re.compile(
    r"(?P<string>"
    r"'''(?:[^'\\]|\\.|'(?!''))*'''"
    r'|"""(?:[^"\\]|\\.|"(?!""))*"""'
    r"|'(?:[^'\\\n]|\\.)*'"
    r'|"(?:[^"\\\n]|\\.)*"'
    r")|#[^\n]*",
    re.DOTALL,
)


def builtin_documents(name: str) -> list[str]:
    """The documents of built-in corpus ``name`` (with or without the ``builtin:`` prefix)."""
    key = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else name
    if key == "stdlib-code":
        return list(_stdlib_corpora()[0])
    if key == "stdlib-prose":
        return list(_stdlib_corpora()[1])
    known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)
    raise ValueError(f"unknown built-in corpus {name!r}; known: {known}")


def _stdlib_files() -> list[str]:
    """The standard library's ``.py`` files, in sorted (deterministic) order."""
    root = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return files


@functools.lru_cache(maxsize=1)
def _stdlib_corpora() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(code documents, prose documents), from one pass over the stdlib sources."""
    start = time.monotonic()
    code: list[str] = []
    prose: list[str] = []
    with _gc_paused():
        _scan_stdlib(code, prose)
    prose.extend(_pydoc_topic_documents())
    prose = list(dict.fromkeys(prose))  # the same docstring appears in several places
    logger.debug(
        "built stdlib corpora (%d code, %d prose documents) in %.1fs", len(code), len(prose), time.monotonic() - start
    )
    return tuple(code), tuple(prose)


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while parsing.

    ``ast.parse`` allocates millions of short-lived nodes, which triggers
    collections that cost ~40% of the build time; syntax trees hold no
    reference cycles, so reference counting alone frees them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _scan_stdlib(code: list[str], prose: list[str]) -> None:
    """Append each stdlib file's stripped source to ``code`` and its prose docstrings to ``prose``."""
    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source, filename=path)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # unreadable or not parseable by this interpreter
        docstrings = list(_docstrings(tree))
        prose.extend(filter(None, (_prose_from_docstring(inspect.cleandoc(d.value.value)) for _, d in docstrings)))
        prose.extend(_comment_documents(source))
        stripped = _strip_code(source, docstrings)
        if stripped:
            code.extend(_top_level_units(stripped))


_TOP_LEVEL_DEF = re.compile(r"^(?=@|def |class |async def )", re.MULTILINE)
_MIN_UNIT_CHARS = 400


def _top_level_units(source: str) -> list[str]:
    """One document per top-level definition (small neighbours merged), not per file.

    Files run to thousands of tokens; whole-file documents would let a token
    budget be filled by a handful of modules. Definitions give a broad sample.
    """
    units: list[str] = []
    pending = ""
    for piece in _TOP_LEVEL_DEF.split(source):
        pending += piece
        if len(pending) >= _MIN_UNIT_CHARS:
            units.append(pending.strip("\n"))
            pending = ""
    if pending.strip():
        if units:
            units[-1] += "\n" + pending.strip("\n")
        else:
            units.append(pending.strip("\n"))
    return units


def _docstrings(node: ast.AST):
    """(owner, docstring expression) pairs, visiting statements only (expressions hold none)."""
    body = getattr(node, "body", None)
    if (
        isinstance(node, _DOC_OWNERS)
        and body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        yield node, body[0]
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        children = getattr(node, field, None)
        if isinstance(children, list):
            for child in children:
                yield from _docstrings(child)


def _code_string(m) -> str:
    """Comments go; a string literal holding English words (a message) becomes an empty one."""
    text = m.group("string")
    if not text:
        return ""
    quote = text[:3] if text[:3] in ("'''", '"""') else text[0]
    body = text[len(quote) : -len(quote)]
    return quote * 2 if re.search(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}", body) else text


def _strip_code(source: str, docstrings) -> str:
    """``source`` without its docstrings and comments, keeping the original layout.

    Rewriting the source (not ``ast.unparse``) keeps the code as people write it
    and is several times faster. A docstring that shares a line with other code
    (``def f(): "doc"``) is left in place; a body left empty becomes ``pass``.
    """
    lines = source.splitlines(keepends=True)
    for owner, doc in docstrings:
        first, last = lines[doc.lineno - 1], lines[doc.end_lineno - 1]
        indent = len(first) - len(first.lstrip())
        if doc.col_offset != indent or len(last.rstrip().encode()) != doc.end_col_offset:
            continue
        lines[doc.lineno - 1 : doc.end_lineno] = [""] * (doc.end_lineno - doc.lineno + 1)
        if len(owner.body) == 1:
            lines[doc.lineno - 1] = first[:indent] + "pass\n"
    code = _STRING_OR_COMMENT.sub(_code_string, "".join(lines))
    code = "\n".join(line.rstrip() for line in code.splitlines())
    return re.sub(r"\n{3,}", "\n\n", code).strip()


_COMMENT_LINE = re.compile(r"^[ \t]*#[ \t]?(.*)$")


def _comment_documents(source: str) -> list[str]:
    """The file's comment blocks (runs of comment-only lines) as cleaned prose, merged to documents."""
    blocks, current = [], []
    for line in source.splitlines():
        m = _COMMENT_LINE.match(line)
        if m and not line.lstrip().startswith("#!"):
            current.append(m.group(1))
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    docs, pending = [], ""
    for block in blocks:
        text = _clean_prose(block)
        if not text:
            continue
        pending = f"{pending}\n\n{text}" if pending else text
        if len(pending) >= 4 * _MIN_PROSE_CHARS:
            docs.append(pending)
            pending = ""
    if len(pending) >= _MIN_PROSE_CHARS:
        docs.append(pending)
    return [d for d in docs if _mostly_letters(d)]


def _prose_from_docstring(doc: str) -> str | None:
    """The docstring without doctest lines, if what is left is long, mostly-letter prose."""
    text = _clean_prose(doc)
    return text if _looks_like_prose(text) else None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
# A sentence holding any of these reads as code, not English: operators and
# markup, dotted names, calls, camel-case identifiers.
_CODE_WORD = re.compile(
    r"[_=<>{}\[\]`@#\\|^~]"
    r"|\w\.\w"
    r"|\w\("
    r"|\b[a-z]+[A-Z]\w*"
    r"|\b[A-Z][a-z]+[A-Z]\w*"
    r"|::|->|\.\.\."
)
_NON_PROSE_LINE = re.compile(r"^\s*(>>>|\.\.\.(\s|$)|[-=~^*+]{3,}\s*$|[-*+] |\w[\w ]{0,30}:\s*$|:)")


def _clean_prose(text: str, min_words: int = 4) -> str:
    """Only the plain-English sentences of ``text``, re-wrapped, paragraph by paragraph.

    Indented blocks (examples, parameter tables), doctests, headings, lists and
    every sentence naming an identifier or holding markup are dropped, so the
    prose corpus shares as little as possible with the code corpus.
    """
    out = []
    for para in re.split(r"\n\s*\n", text):
        if not para.strip() or para[:1].isspace():
            continue
        lines = para.splitlines()
        if any(_NON_PROSE_LINE.match(line) for line in lines):
            continue
        flat = " ".join(line.strip() for line in lines)
        kept = [
            s
            for s in _SENTENCE_END.split(flat)
            if len(s.split()) >= min_words and not _CODE_WORD.search(s) and s.rstrip()[-1:] in ".!?:;,"
        ]
        if kept:
            out.append(textwrap.fill(" ".join(kept), width=72))
    return "\n\n".join(out)


def _looks_like_prose(text: str) -> bool:
    return len(text) >= _MIN_PROSE_CHARS and _mostly_letters(text)


def _mostly_letters(text: str) -> bool:
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isalpha() for c in chars) / len(chars) >= _MIN_LETTER_FRACTION


def _pydoc_topic_documents() -> list[str]:
    """One document per ``pydoc_data.topics`` topic: its unindented prose paragraphs."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    documents = []
    for name in sorted(topics):
        paragraphs = [
            p.strip()
            for p in re.split(r"\n\s*\n", topics[name])
            if p.strip() and not p[:1].isspace() and _is_prose_paragraph(p)
        ]
        text = _clean_prose("\n\n".join(paragraphs))
        if len(text) >= _MIN_PROSE_CHARS:
            documents.append(text)
    return documents


def _is_prose_paragraph(paragraph: str) -> bool:
    """Not a heading underline, grammar rule or code: several words, mostly letters."""
    return (
        len(paragraph.split()) >= 5
        and not any(_CODE_LINE.match(line) for line in paragraph.splitlines())
        and _mostly_letters(paragraph)
    )
