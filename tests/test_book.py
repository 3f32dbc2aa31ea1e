"""The course as readers get it: the site and the slides in a headless browser, and the student edition.

The browser tests open the built site (`make book`, build/book/html) and the lecture decks (`make slides`,
build/slides) in headless Chromium through chromedriver, served from 127.0.0.1, and check on every page that it
loads without errors, that MathJax typeset every formula, that every image loaded, and that no request left the
machine. They are skipped, with the reason, where Chromium, chromedriver, selenium or the built pages are missing;
`.ci/run` installs Chromium and builds both first, so CI runs them.

The student edition (`make student`) is built into a temporary directory: it ships neither the solutions nor a
pointer to them, and its exercise checks run from its own copy of the package.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("course", ROOT / "scripts" / "course.py")
course = importlib.util.module_from_spec(spec)
spec.loader.exec_module(course)

NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks" / "src").glob("[0-9][0-9]*_*.py"))
PAGES = ["index.html", "book/index.html", "book/teaching_path.html", "notebooks/README.html",
         *(f"notebooks/{stem}.html" for stem in NOTEBOOKS)]
DECKS = [f"{name}.html" for name in course.LECTURES]
CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")


# ------------------------------------------------------------------------------------------------- the browser


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    """An HTTP server on 127.0.0.1 for build/ (a browser refuses web fonts from file:// pages)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(course.BUILD)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium needs the Debian packages chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e .[course]")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _requests(driver) -> list[str]:
    """The URLs the page requested since the last call (from Chromium's DevTools log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _open(driver, url: str) -> tuple[list[str], list[str]]:
    """Load a page; return the requests it made and the errors its console logged."""
    driver.get_log("performance"), driver.get_log("browser")  # start from a clean log
    driver.get(url)
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const settle = () => setTimeout(() => done(true), 200);
        if (document.readyState === "complete") settle(); else window.addEventListener("load", settle);""")
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    # what fails the page: a resource that did not load, a script error, a blocked request (the browser's own
    # request for /favicon.ico aside); messages that scripts log deliberately are not failures
    failures = [m for m in errors if any(s in m for s in ("Failed to load", "Uncaught", "Refused", "blocked"))
                and "/favicon.ico" not in m]
    return _requests(driver), failures


def _maths_typeset(driver) -> dict:
    """Wait for MathJax (if the page loads it), then count the formulas and those it typeset."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const count = () => done({
            mathjax: !!(window.MathJax && MathJax.startup),
            formulas: document.querySelectorAll(".math").length,
            typeset: [...document.querySelectorAll(".math")].filter(e => e.querySelector("mjx-container")).length,
            containers: document.querySelectorAll("mjx-container").length,
            errors: document.querySelectorAll("mjx-merror").length,
        });
        const wait = (tries) => {
            if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
                MathJax.startup.promise.then(count, count);
            } else if (tries > 0 && document.querySelector("script[src*='mathjax']")) {
                setTimeout(() => wait(tries - 1), 100);
            } else { count(); }
        };
        wait(100);""")


def _images(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.images].map(i => ({src: i.currentSrc || i.src, complete: i.complete, "
        "width: i.naturalWidth}));")


def _offsite(urls: list[str], server: str) -> list[str]:
    """The requests that went to another host (the browser's own chrome:// pages are not requests of the page)."""
    return [u for u in urls if not u.startswith((server + "/", "data:", "blob:", "about:", "chrome:"))]


def _need(path: Path, target: str):
    if not path.is_file():
        pytest.skip(f"{path.relative_to(ROOT)} is not built: run `make {target}`")


@pytest.mark.parametrize("page", PAGES)
def test_site_page_loads_offline_with_its_maths_and_figures(browser, server, page):
    _need(course.SITE / page, "book")
    requests, errors = _open(browser, f"{server}/book/html/{page}")
    assert browser.current_url.startswith(server), browser.current_url
    assert not errors, f"{page}: the console reports {errors}"
    assert browser.execute_script("return [...document.querySelectorAll('h1')].some(h => h.innerText.trim())"), (
        f"{page}: no title shown")
    maths = _maths_typeset(browser)
    assert maths["errors"] == 0, f"{page}: MathJax reports {maths['errors']} errors"
    assert maths["typeset"] == maths["formulas"], f"{page}: {maths}"
    if page.startswith("notebooks/0"):
        assert maths["mathjax"] and maths["containers"] > 0, f"{page}: no formula typeset ({maths})"
        figures = [i for i in _images(browser) if "_images/" in i["src"]]
        source = nbformat.read(ROOT / page.replace(".html", ".ipynb"), as_version=4)
        pngs = sum("image/png" in o.get("data", {}) for c in source.cells for o in c.get("outputs", []))
        assert len(figures) == pngs, f"{page}: {len(figures)} figures shown, the notebook has {pngs} (`make book`?)"
    broken = [i["src"] for i in _images(browser) if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"{page}: images that did not load: {broken}"
    assert not _offsite(requests + _requests(browser), server), f"{page}: requests to other hosts"


def test_site_root_leads_to_the_course(browser, server):
    _need(course.SITE / "index.html", "book")
    _open(browser, f"{server}/book/html/index.html")
    browser.implicitly_wait(0)
    for _ in range(50):
        if browser.current_url.endswith("/book/index.html"):
            break
        browser.execute_async_script("setTimeout(arguments[arguments.length - 1], 100)")
    assert browser.current_url.endswith("/book/html/book/index.html"), browser.current_url
    links = browser.execute_script("return [...document.querySelectorAll('a')].map(a => a.getAttribute('href'))")
    for stem in NOTEBOOKS:
        assert any(h and h.endswith(f"{stem}.html") for h in links), f"the course page does not link {stem}"


@pytest.mark.parametrize("deck", DECKS)
def test_slides_load_offline_with_maths_figures_and_notes(browser, server, deck):
    _need(course.SLIDES / deck, "slides")
    requests, errors = _open(browser, f"{server}/slides/{deck}")
    assert not errors, f"{deck}: the console reports {errors}"
    state = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const report = () => done({ready: Reveal.isReady(), slides: Reveal.getTotalSlides(),
                                   notes: document.querySelectorAll("aside.notes").length,
                                   speaker: Reveal.hasPlugin("notes")});
        if (Reveal.isReady()) report(); else Reveal.on("ready", report);""")
    assert state["ready"] and state["slides"] >= 4 and state["speaker"], f"{deck}: {state}"
    assert state["notes"] >= 1, f"{deck}: no speaker notes"
    maths = _maths_typeset(browser)
    assert maths["mathjax"] and maths["containers"] > 0 and maths["errors"] == 0, f"{deck}: {maths}"
    raw = browser.execute_script("return [...document.querySelectorAll('.slides section')]"
                                 ".some(s => /\\$[^$\\s][^$]*\\$/.test(s.innerText))")
    assert not raw, f"{deck}: a formula was left as TeX source"
    images = _images(browser)
    assert images, f"{deck}: no figure"
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"{deck}: images that did not load: {broken}"
    assert not _offsite(requests + _requests(browser), server), f"{deck}: requests to other hosts"


# ------------------------------------------------------------------------------------------------- static checks


def test_site_check_flags_remote_resources_and_broken_links(tmp_path):
    (tmp_path / "a.html").write_text('<html><body><h1 id="top">A</h1><a href="b.html#x">b</a><a href="#top">t</a>'
                                     '<a href="https://example.org/">external link, fine</a></body></html>')
    (tmp_path / "b.html").write_text('<html><head><script src="https://cdn.example.org/mathjax.js"></script>'
                                      '<link rel="stylesheet" href="//fonts.example.org/css"></head>'
                                      '<body><img src="missing.png"><a href="gone.html">g</a></body></html>')
    (tmp_path / "s.css").write_text('@import url("https://fonts.example.org/x.css"); p { }')
    problems = "\n".join(course.check_site(tmp_path))
    for expected in ("b.html: loads https://cdn.example.org/mathjax.js", "b.html: loads //fonts.example.org/css",
                     "b.html: loads missing.png", "b.html: links to gone.html", "a.html: links to b.html#x",
                     "s.css: imports https://fonts.example.org/x.css"):
        assert expected in problems, problems
    assert "example.org/\"" not in problems and "#top" not in problems


def _build_site(src: Path, links: str) -> subprocess.CompletedProcess:
    """Build a two-page site with the course's Sphinx configuration (book/conf.py), the index holding `links`."""
    (src / "book").mkdir(parents=True, exist_ok=True)
    (src / "notebooks").mkdir(exist_ok=True)
    (src / "book" / "index.md").write_text(f"# Home\n\n{links}\n\n```{{toctree}}\n../notebooks/README\n```\n")
    (src / "notebooks" / "README.md").write_text("# Notes\n\n## Notation\n\n$x_t$\n")
    mathjax = src.parent / "mathjax"  # a stand-in for the npm package: only copied, never run here
    mathjax.mkdir(exist_ok=True)
    (mathjax / "tex-chtml.js").write_text("")
    env = {**os.environ, "MARS_REF_MATHJAX": str(mathjax)}
    return subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-E", "-n", "-W", "--keep-going", "-q",
                           "-c", str(ROOT / "book"), str(src), str(src.with_name(src.name + "-html"))],
                          capture_output=True, text=True, env=env, timeout=300)


def test_site_build_fails_on_a_broken_internal_link(tmp_path):
    pytest.importorskip("myst_nb", reason="the site's tools are not installed: pip install -e .[course]")
    good = _build_site(tmp_path / "good", "[notation](../notebooks/README.md#notation)")
    assert good.returncode == 0, good.stderr[-2000:]
    assert (tmp_path / "good-html" / "_static" / "mathjax" / "tex-chtml.js").exists()
    for link in ("[gone](../notebooks/gone.ipynb)", "[anchor](../notebooks/README.md#nowhere)"):
        bad = _build_site(tmp_path / f"bad{len(link)}", link)
        assert bad.returncode != 0 and "xref_missing" in bad.stderr, (link, bad.stderr[-2000:])


# ------------------------------------------------------------------------------------------------- student edition


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return course.build_student(tmp_path_factory.mktemp("student") / "mars_ref")


def test_student_edition_ships_no_solutions(student):
    assert not (student / "notebooks" / "solutions").exists() and not (student / "tests").exists()
    assert sorted(p.stem for p in (student / "notebooks").glob("*.ipynb")) == NOTEBOOKS
    assert (student / "mars_ref" / "course" / "exercises.py").is_file() and (student / "pyproject.toml").is_file()
    assert course.check_student(student) == []
    for path in sorted((student / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        text = "\n".join(c.source for c in nb.cells)
        assert "solutions/" not in text, path.name
        assert "raise NotImplementedError" in text or path.stem.startswith("07"), f"{path.name}: no exercise stub"
    assert "solutions/" not in (student / "notebooks" / "README.md").read_text()


def test_student_edition_check_refuses_a_leaked_solution(student, tmp_path):
    leaked = tmp_path / "edition"
    shutil.copytree(student / "notebooks", leaked / "notebooks")
    path = leaked / "notebooks" / f"{NOTEBOOKS[0]}.ipynb"
    nb = nbformat.read(path, as_version=4)
    solution = (course.SOLUTIONS / "nb01.py").read_text()
    nb.cells.append(nbformat.v4.new_code_cell(solution.split('"""', 2)[2]))
    nb.cells.append(nbformat.v4.new_markdown_cell("See `notebooks/solutions/nb01.py`."))
    nbformat.write(nb, path)
    problems = "\n".join(course.check_student(leaked))
    assert "contains the solution nb01.sgd_noise_floor" in problems and "names the solutions" in problems, problems


def test_student_edition_exercises_check_without_the_solutions(student):
    """The exercise cells of a student notebook run against the edition's own package: stubs are not answered yet."""
    nb = nbformat.read(student / "notebooks" / f"{NOTEBOOKS[1]}.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    start = next(i for i, s in enumerate(code) if "raise NotImplementedError" in s)
    program = "from mars_ref.course.exercises import check\n" + "\n".join(code[start:])
    program += "\nimport mars_ref\nprint('package', mars_ref.__file__)\n"
    env = {**os.environ, "PYTHONPATH": str(student), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", program], cwd=student / "notebooks", env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    asked = sum(s.count("check(") for s in code[start:])
    assert asked >= 1 and result.stdout.count("not answered yet") == asked, result.stdout
    assert f"package {student}" in result.stdout, result.stdout
