"""Sphinx configuration of the course site: `make book` (scripts/course.py book) builds it into build/book/html.

The source directory is the repository root, so the committed notebooks and notebooks/README.md are read where
they are and their relative links (``README.md#notation``, ``02_storm_step_by_step.ipynb``) resolve as in Jupyter.
Only the pages below are read (``include_patterns``); the notebooks are rendered with their committed outputs and
never executed. MathJax is served from the site itself (``_static/mathjax``, copied from the npm package by
scripts/course.py), so a page loads nothing from another host.
"""

import importlib.util
import os
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.transforms.post_transforms import SphinxPostTransform

ROOT = Path(__file__).resolve().parents[1]

project = "MARS: variance reduction, a short course"
author = "mars_ref"
copyright = "mars_ref contributors"
root_doc = "book/index"

extensions = ["myst_nb"]
include_patterns = ["book/*.md", "notebooks/*.ipynb", "notebooks/README.md", "notebooks/LAB.md"]
exclude_patterns = [".venv", ".git", "build", "data", "runs", "out", "benchmarks", "mars_ref", "tests", "docs",
                    "**/.ipynb_checkpoints", "**/node_modules"]

# the notebooks as committed: outputs included, nothing executed
nb_execution_mode = "off"
nb_merge_streams = True
# the slider playground of 03b has no stored widget state: show its static fallback, load no widget JavaScript
nb_ipywidgets_js = {}
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None),
                              ("html", "application/vnd.jupyter.widget-state+json", None)]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # README.md#notation, README.md#bibliography

# MathJax 3 from this site, never from a CDN (scripts/course.py copies it to _static/mathjax)
MATHJAX = Path(os.environ.get("MARS_REF_MATHJAX", ROOT / "build" / "node" / "node_modules" / "mathjax" / "es5"))
mathjax_path = "mathjax/tex-chtml.js"

html_theme = "sphinx_book_theme"
html_title = "MARS: variance reduction"
html_theme_options = {
    "show_navbar_depth": 1,
    "home_page_in_toc": True,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}
html_extra_path = ["extra"]  # index.html at the site's root: a redirect to book/index.html
html_last_updated_fmt = None
html_copy_source = True
html_show_sourcelink = False
html_show_sphinx = False

nitpicky = True
suppress_warnings = []


class RepositoryLinks(SphinxPostTransform):
    """A link to a file of the repository that is not a page of the site (``../benchmarks/results/study.md``,
    ``figures/``) becomes its text: it works in a checkout, and the site has no copy to point to. A link to a path
    that does not exist is left to MyST, which reports it (a warning, an error under ``-W``)."""

    default_priority = 8  # before MyST resolves its references (9)

    def run(self, **kwargs):
        for node in list(self.document.findall(addnodes.pending_xref)):
            if node.get("reftype") != "myst":
                continue
            refdoc = node.get("refdoc", self.env.docname)
            if node.get("refdomain") == "doc":
                if node["reftarget"] in self.env.found_docs:
                    continue
                stem = Path(self.env.srcdir) / node["reftarget"]
                target = next((stem.with_name(stem.name + s) for s in self.config.source_suffix
                               if stem.with_name(stem.name + s).is_file()), stem)
            elif node.get("refdomain") is None and not node["reftarget"].startswith("#"):
                base = (Path(self.env.srcdir) / refdoc).parent
                target = (base / node["reftarget"].split("#", 1)[0]).resolve()
            else:
                continue
            inside = ROOT in target.parents
            if inside and target.exists() and not target.is_relative_to(ROOT / "build"):
                node.replace_self(nodes.inline("", "", *node.children, classes=["repository-path"]))


def _copy_mathjax(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    if not (MATHJAX / "tex-chtml.js").is_file():
        raise FileNotFoundError(f"MathJax 3 not found in {MATHJAX}: build with `make book` (it installs MathJax)")
    spec = importlib.util.spec_from_file_location("course", ROOT / "scripts" / "course.py")
    course = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(course)
    course.MATHJAX = MATHJAX
    course.copy_mathjax(Path(app.outdir) / "_static" / "mathjax")


def setup(app):
    # MathJax on every page: the navigation shows notebook titles with formulas on pages that have none of their own
    app.set_html_assets_policy("always")
    app.add_post_transform(RepositoryLinks)
    app.connect("build-finished", _copy_mathjax)
