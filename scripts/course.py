"""Build the course from the committed notebooks: the site, the lecture slides and the student edition.

    python scripts/course.py book      # build/book/html: every notebook with its outputs, the course pages (Sphinx)
    python scripts/course.py slides    # build/slides: one reveal.js deck per lecture, with speaker notes
    python scripts/course.py student   # build/student/mars_ref: the notebooks and the package, without solutions

(``make book``, ``make slides``, ``make student``.) Nothing is executed: the site and the slides show the outputs the
notebooks were committed with (``make notebooks`` refreshes them).

**Offline.** A built page loads nothing from another host. MathJax 3 and reveal.js 6 come from their npm packages,
installed once into ``build/node`` (:data:`NODE_PACKAGES`, pinned) and copied beside the pages; :func:`check_site`
fails a build whose HTML or CSS points a script, a style sheet, an image or a font at a remote URL, or links to a
local file or anchor that does not exist.

**The site** is Sphinx with MyST-NB and sphinx-book-theme (``book/conf.py``): pip packages that build offline.
Jupyter Book 2 (mystmd) was tried and fetches its theme from a web service at build time, so it cannot build
without the internet. Sphinx runs with ``-W -n`` (warnings, broken cross-references included, are errors).

**The slides.** Each lecture in :data:`LECTURES` is a deck of the cells tagged ``slide`` in its notebooks
(``# %% [markdown] tags=["slide"]`` in ``notebooks/src``): a markdown cell is a slide, a code cell shows its outputs
(its figures), and a cell tagged ``notes`` becomes the speaker notes of the slide before it (press ``s``).

**The student edition** is the checkout without the exercise solutions (``notebooks/solutions``), the tests that use
them, the notebook sources and the build tooling; the sentences that point to the solutions are left out of the
notebooks and of ``notebooks/README.md``. :func:`check_student` refuses an edition that still names or contains a
solution.
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
NODE = BUILD / "node"
NODE_PACKAGES = {"mathjax": "3.2.2", "reveal.js": "6.0.2"}
MATHJAX = NODE / "node_modules" / "mathjax" / "es5"
REVEAL = NODE / "node_modules" / "reveal.js" / "dist"
SITE = BUILD / "book" / "html"
SLIDES = BUILD / "slides"
STUDENT = BUILD / "student" / "mars_ref"
SOLUTIONS = ROOT / "notebooks" / "solutions"

# The lectures of book/teaching_path.md and the notebooks each deck is made of (by name prefix).
LECTURES = {
    "lecture1": ("Lecture 1: noise, STORM, SVRG and SARAH", ("01_", "02_", "02b_")),
    "lecture2": ("Lecture 2: from STORM to MARS", ("03_", "03b_", "04_")),
}


def _run_notebooks():
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_notebooks

    return run_notebooks


def ensure_node_packages() -> None:
    """Install MathJax and reveal.js (the versions of :data:`NODE_PACKAGES`) into build/node unless they are there."""
    def installed(name):
        meta = NODE / "node_modules" / name / "package.json"
        return meta.is_file() and json.loads(meta.read_text()).get("version")

    missing = [f"{name}@{version}" for name, version in NODE_PACKAGES.items() if installed(name) != version]
    if not missing:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is needed once, to install " + " ".join(missing) + " into build/node (Node.js 18+)")
    NODE.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--prefix", str(NODE), "--no-save", "--no-audit", "--no-fund", "--loglevel=error",
                    *missing], check=True)


def copy_mathjax(dest: Path) -> None:
    """The parts of MathJax 3 that ``tex-chtml.js`` loads (components, CHTML fonts, accessibility, menu)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(MATHJAX / "tex-chtml.js", dest / "tex-chtml.js")
    for sub in ("input", "output/chtml", "a11y", "ui", "adaptors", "sre"):
        if (MATHJAX / sub).is_dir():
            shutil.copytree(MATHJAX / sub, dest / sub, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------- checks


class _Page(HTMLParser):
    """The URLs a page loads (scripts, styles, images, frames) and links to, and the ids it defines."""

    LOADS = {("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"), ("source", "src"),
             ("video", "src"), ("audio", "src"), ("embed", "src"), ("object", "data")}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.loads: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key) and (key == "id" or tag == "a"):
                self.ids.add(attrs[key])
        for t, a in self.LOADS:
            if tag == t and attrs.get(a):
                if tag == "link" and attrs.get("rel") in ("canonical", "alternate"):
                    continue
                self.loads.append(attrs[a])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def _remote(url: str) -> bool:
    return bool(re.match(r"^(https?:)?//", url.strip(), re.I))


def check_site(root: Path) -> list[str]:
    """Problems of a built site: remote resources in HTML or CSS, links to local files or anchors that do not exist."""
    problems = []
    pages = {p: _Page() for p in root.rglob("*.html") if "_static" not in p.relative_to(root).parts}
    for path, page in pages.items():
        page.feed(path.read_text(errors="replace"))
    for path, page in pages.items():
        rel = path.relative_to(root)
        for url in page.loads:
            if _remote(url):
                problems.append(f"{rel}: loads {url} from another host")
            elif not url.startswith("data:"):
                target = (path.parent / unquote(urlsplit(url).path)).resolve()
                if not target.exists():
                    problems.append(f"{rel}: loads {url}, which does not exist")
        for url in page.links:
            parts = urlsplit(url)
            if parts.scheme or url.startswith("//"):
                continue  # an external link is followed by the reader, never loaded by the page
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{rel}: links to {url}, which does not exist")
            elif parts.fragment and target.suffix == ".html" and target in pages:
                ids = pages[target].ids | {unquote(i) for i in pages[target].ids}
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{rel}: links to {url}, whose anchor does not exist")
    for css in root.rglob("*.css"):
        for url in re.findall(r"""url\(\s*['"]?([^'")]+)""", css.read_text(errors="replace")):
            if _remote(url):
                problems.append(f"{css.relative_to(root)}: loads {url} from another host")
        for url in re.findall(r"""@import\s+(?:url\()?\s*['"]?([^'");\s]+)""", css.read_text(errors="replace")):
            if _remote(url):
                problems.append(f"{css.relative_to(root)}: imports {url} from another host")
    return problems


def _fail_on(problems: list[str], what: str) -> None:
    if problems:
        raise SystemExit(f"{what}: {len(problems)} problem(s)\n  " + "\n  ".join(problems[:50]))


# ------------------------------------------------------------------------------------------------- the site


def build_book(out: Path = SITE) -> Path:
    ensure_node_packages()
    env = {**os.environ, "MARS_REF_MATHJAX": str(MATHJAX)}
    # -E: a fresh environment, so the warnings of every page are raised again (and fail the build under -W)
    subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-E", "-n", "-W", "--keep-going", "-q",
                    "-c", str(ROOT / "book"), str(ROOT), str(out)], check=True, env=env, cwd=ROOT)
    _fail_on(check_site(out), f"the site in {out}")
    pages = sorted(out.rglob("*.html"))
    print(f"site: {len(pages)} pages in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}, "
          f"no remote resources, no broken local links")
    return out


# ------------------------------------------------------------------------------------------------- the slides


def _markdown(source: str) -> str:
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    text = markdown2html_mistune(source)
    text = re.sub(r'<a class="anchor-link" href="[^"]*">[^<]*</a>', "", text)  # a slide has no permalinks
    return _relink(text)


def _relink(text: str) -> str:
    """Relative links of the notebooks (other notebooks, README.md#notation) point to the pages of the site."""
    def fix(match):
        url = html.unescape(match.group(1))
        parts = urlsplit(url)
        if parts.scheme or url.startswith(("#", "//")):
            return match.group(0)
        name = Path(parts.path).name
        if name.endswith((".ipynb", ".md")):
            page = "../book/html/notebooks/" + re.sub(r"\.(ipynb|md)$", ".html", name)
            return f'href="{html.escape(page + ("#" + parts.fragment if parts.fragment else ""))}"'
        return 'href="../book/html/book/index.html"'
    return re.sub(r'href="([^"]*)"', fix, text)


def _outputs(cell, images: Path, stem: str) -> str:
    """A code cell's outputs as HTML: each figure as an image file, printed text as preformatted text."""
    import base64

    parts = []
    for k, out in enumerate(cell.get("outputs", [])):
        data = out.get("data", {})
        if "image/png" in data:
            name = f"{stem}-{k}.png"
            (images / name).write_bytes(base64.b64decode(data["image/png"]))
            parts.append(f'<img class="figure" src="{images.name}/{name}" alt="figure {stem}-{k}">')
        elif out.get("output_type") == "stream":
            parts.append(f'<pre class="output">{html.escape(out.get("text", ""))}</pre>')
    return "\n".join(parts)


def lecture_cells(prefixes) -> list[tuple[Path, nbformat.NotebookNode, list]]:
    """For each notebook of a lecture: its source, the committed notebook, and the cells tagged slide or notes.

    The tags come from ``notebooks/src``; the outputs from the committed notebook, whose tagged cells must be those
    of the source (else ``make notebooks`` is due)."""
    run_notebooks = _run_notebooks()
    out = []
    for prefix in prefixes:
        src = next(iter(sorted((ROOT / "notebooks" / "src").glob(prefix + "*.py"))), None)
        if src is None:
            raise SystemExit(f"no notebook source starts with {prefix!r}")
        built = run_notebooks.build(src)
        committed = nbformat.read(ROOT / "notebooks" / f"{src.stem}.ipynb", as_version=4)
        by_id = {c.get("id"): c for c in committed.cells}
        tagged = []
        for cell in built.cells:
            tags = set(cell.metadata.get("tags", ()))
            if not tags & {"slide", "notes"}:
                continue
            done = by_id.get(cell.id)
            if done is None or done.source != cell.source:
                raise SystemExit(f"notebooks/{src.stem}.ipynb is out of step with its source: run `make notebooks`")
            tagged.append((tags, done))
        out.append((src, committed, tagged))
    return out


DECK = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{title}</title>
<link rel="stylesheet" href="reveal/reset.css">
<link rel="stylesheet" href="reveal/reveal.css">
<link rel="stylesheet" href="reveal/theme/white.css">
<style>
.reveal .slides section {{ font-size: 0.7em; text-align: left; height: 100%; overflow-y: auto; }}
.reveal h1 {{ font-size: 1.9em; }} .reveal h2 {{ font-size: 1.5em; }} .reveal h3 {{ font-size: 1.2em; }}
.reveal img.figure {{ display: block; margin: 0 auto; max-height: 560px; max-width: 100%; }}
.reveal pre.output {{ font-size: 0.6em; box-shadow: none; }}
.reveal p.from {{ font-size: 0.6em; color: #666; }}
.reveal section.title {{ text-align: center; }}
</style>
</head>
<body>
<div class="reveal"><div class="slides">
{slides}
</div></div>
<script src="reveal/reveal.js"></script>
<script src="reveal/plugin/notes.js"></script>
<script src="reveal/plugin/math.js"></script>
<script>
Reveal.initialize({{
  hash: true, width: 1280, height: 720, margin: 0.04,
  mathjax3: {{
    mathjax: "mathjax/tex-chtml.js",
    tex: {{ inlineMath: [["$", "$"], ["\\\\(", "\\\\)"]], displayMath: [["$$", "$$"], ["\\\\[", "\\\\]"]],
           processEscapes: true, tags: "ams" }},
  }},
  plugins: [RevealNotes, RevealMath.MathJax3],
}});
</script>
</body>
</html>
"""


def build_deck(name: str, title: str, prefixes, out: Path) -> tuple[int, int]:
    """One lecture's deck: ``out/<name>.html`` and its figures in ``out/<name>_files``. Returns (slides, notes)."""
    images = out / f"{name}_files"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    notebooks = lecture_cells(prefixes)
    heads = [committed.cells[0].source.splitlines()[0].lstrip("# ").strip() for _, committed, _ in notebooks]
    slides = [[f'<section class="title"><h1>{html.escape(title)}</h1>'
               + "".join(f"<p>{_markdown(h)[3:-5]}</p>" for h in heads), []]]
    n_notes = 0
    for src, _, tagged in notebooks:
        number = src.stem.split("_")[0]
        for tags, cell in tagged:
            if cell.cell_type == "markdown":
                body = _markdown(cell.source)
            else:
                body = _outputs(cell, images, cell.get("id", number))
            if "slide" in tags:
                slides.append([f'<section data-notebook="{number}">{body}<p class="from">notebook {number}</p>', []])
            else:
                slides[-1][1].append(body)
                n_notes += 1
    sections = []
    for head, notes in slides:
        aside = f'<aside class="notes">{"".join(notes)}</aside>' if notes else ""
        sections.append(f"{head}{aside}</section>")
    (out / f"{name}.html").write_text(DECK.format(title=html.escape(title), slides="\n".join(sections)))
    return len(slides), n_notes


def build_slides(out: Path = SLIDES) -> Path:
    ensure_node_packages()
    out.mkdir(parents=True, exist_ok=True)
    reveal = out / "reveal"
    shutil.rmtree(reveal, ignore_errors=True)
    for part in ("reset.css", "reveal.css", "reveal.js", "theme/white.css", "plugin/notes.js", "plugin/math.js"):
        (reveal / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REVEAL / part, reveal / part)
    copy_mathjax(out / "mathjax")
    items = []
    for name, (title, prefixes) in LECTURES.items():
        n_slides, n_notes = build_deck(name, title, prefixes, out)
        items.append(f'<li><a href="{name}.html">{html.escape(title)}</a> ({n_slides} slides)</li>')
        print(f"slides: {name}.html, {n_slides} slides, {n_notes} with speaker notes")
    (out / "index.html").write_text('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Slides</title>'
                                    f'</head><body><h1>Lecture slides</h1><ul>{"".join(items)}</ul>'
                                    '<p>In a deck: <kbd>s</kbd> opens the speaker notes, <kbd>f</kbd> full screen.</p>'
                                    '</body></html>\n')
    problems = [p for p in check_site(out) if "../book/html/" not in p]  # links into the site are checked there
    _fail_on(problems, f"the slides in {out}")
    return out


# ------------------------------------------------------------------------------------------------- student edition

# What the student edition leaves out: the solutions, the tests (they import the solutions), the notebook sources and
# the tooling that builds, tests and publishes the course.
STUDENT_EXCLUDE = ("notebooks/solutions/", "tests/", "notebooks/src/", "scripts/", "book/", ".ci/", "Makefile")
SENTENCE = re.compile(r"(?<=[.!?:])\s+(?=[A-Z`*(\[])")


def _without_solution_sentences(text: str) -> str:
    """The text without the sentences that point to the solutions (paragraph by paragraph)."""
    paragraphs = re.split(r"(\n\s*\n)", text)
    out = []
    for para in paragraphs:
        if "solutions" not in para or para.lstrip().startswith(("|", "```", "    ")):
            out.append(para)
            continue
        sentences = SENTENCE.split(para)
        kept = [s for s in sentences if not re.search(r"solutions?/|[Rr]eference\s+solutions?", s)]
        out.append(" ".join(kept) if len(kept) != len(sentences) else para)
    return "".join(out)


def _files() -> list[str]:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout
    return sorted(f for f in set(filter(None, listed.split("\0"))) if (ROOT / f).is_file())


def _function_bodies(source: str) -> dict[str, str]:
    """Each function of a piece of Python (by name): its body without the docstring, as ``ast.unparse`` writes it."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    bodies = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            bodies[node.name] = "\n".join(ast.unparse(stmt) for stmt in body)
    return bodies


def solution_bodies() -> dict[str, str]:
    """``{"nb01.sgd_noise_floor": body, ...}`` for every function of notebooks/solutions."""
    return {f"{path.stem}.{name}": body for path in sorted(SOLUTIONS.glob("*.py"))
            for name, body in _function_bodies(path.read_text()).items()}


def check_student(root: Path) -> list[str]:
    """Problems of a student edition: solutions shipped, named, or written into a notebook."""
    problems = []
    if (root / "notebooks" / "solutions").exists():
        problems.append("notebooks/solutions is shipped")
    for excluded in STUDENT_EXCLUDE:
        if (root / excluded).exists():
            problems.append(f"{excluded} is shipped")
    bodies = solution_bodies()
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        written = {body for c in nb.cells if c.cell_type == "code" for body in _function_bodies(c.source).values()}
        printed = "".join(json.dumps(c.get("outputs", [])) for c in nb.cells if c.cell_type == "code")
        for cell in nb.cells:
            if re.search(r"solutions?/", cell.source):
                problems.append(f"{path.name}: a cell names the solutions: {cell.source[:80]!r}")
        for name, body in bodies.items():
            if body in written and body.strip() != "raise NotImplementedError":
                problems.append(f"{path.name}: contains the solution {name}")
        for line in re.findall(r"Exercise [0-9]+b?\.[0-9] \(\w+\): right\.", printed):
            problems.append(f"{path.name}: prints a solved exercise: {line!r}")
    readme = root / "notebooks" / "README.md"
    if readme.exists() and re.search(r"solutions?/", readme.read_text()):
        problems.append("notebooks/README.md names the solutions")
    return problems


def build_student(out: Path = STUDENT) -> Path:
    """The student edition in ``out``: the checkout without the solutions (see :data:`STUDENT_EXCLUDE`)."""
    shutil.rmtree(out, ignore_errors=True)
    for rel in _files():
        if rel.startswith(STUDENT_EXCLUDE) or rel == "Makefile":
            continue
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.startswith("notebooks/") and rel.count("/") == 1 and rel.endswith(".ipynb"):
            nb = nbformat.read(ROOT / rel, as_version=4)
            for cell in nb.cells:
                if cell.cell_type == "markdown":
                    cell.source = _without_solution_sentences(cell.source)
            nbformat.write(nb, dest)
        elif rel == "notebooks/README.md":
            dest.write_text(_without_solution_sentences((ROOT / rel).read_text()))
        else:
            shutil.copy2(ROOT / rel, dest)
    _fail_on(check_student(out), f"the student edition in {out}")
    n = len(list((out / "notebooks").glob("*.ipynb")))
    print(f"student edition: {n} notebooks and the mars_ref package in "
          f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}, without notebooks/solutions")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", choices=("book", "slides", "student"))
    parser.add_argument("--out", type=Path, help="output directory (one target only)")
    args = parser.parse_args(argv)
    if args.out and len(args.what) > 1:
        parser.error("--out goes with one target")
    builders = {"book": build_book, "slides": build_slides, "student": build_student}
    for what in args.what:
        builders[what](*([args.out.resolve()] if args.out else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
