"""The offline course site: `bash scripts/docs.sh DIR` renders every notebook of nbs/ into DIR (one page per notebook,
index.html from nbs/index.ipynb, a lesson sidebar on every page, no CDN). Checked on the HTML, then in headless
Chromium from a loopback server: the pages render with no request leaving the machine, and the sidebar navigates.
Screenshots: test-artifacts/docs_home.png and test-artifacts/docs_lesson.png.

The browser part needs Debian's chromium (`apt-get install -y chromium`, /usr/bin/chromium) and the playwright
package; it is skipped, saying why, only when chromium is not installed."""
import functools, http.server, json, re, subprocess, threading, time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
DIRECTIVE = re.compile(r"^\s*#\|", re.M)


def lessons() -> list:
    "The lesson notebooks in course order (file-name order), without the home page."
    return sorted(p for p in NBS.glob("*.ipynb") if p.name != "index.ipynb" and not p.name.startswith((".", "_")))


def cells(nb: Path) -> list:
    return json.loads(nb.read_text())["cells"]


def directives(cell) -> dict:
    src = "".join(cell["source"])
    return dict(re.findall(r"^\s*#\|\s*([\w-]+):?\s*(.*)$", src, re.M))


def body_of(cell) -> str:
    "A code cell's source without its directive lines."
    return re.sub(r"^\s*#\|.*$", "", "".join(cell["source"]), flags=re.M).strip()


def squash(s: str) -> str: return re.sub(r"\s+", "", s)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "site"
    t0 = time.time()
    r = subprocess.run(["bash", str(ROOT / "scripts" / "docs.sh"), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"docs.sh failed:\n{r.stdout}\n{r.stderr}"
    print(f"docs.sh: {time.time() - t0:.1f}s; {r.stdout.strip()}")
    return out


def soup(site, name): return BeautifulSoup((site / name).read_text(), "html.parser")


def code_texts(page) -> list:
    "The text of every code cell's source as shown on the page."
    return [d.get_text() for d in page.select(".jp-CodeCell .jp-InputArea-editor")]


def test_one_page_per_notebook(site):
    want = {"index.html"} | {p.stem + ".html" for p in lessons()}
    assert len(want) > 10
    assert {p.name for p in site.glob("*.html")} == want
    assert (site / "docs.css").stat().st_size > 10_000  # the notebook styles, shared by every page


def test_sidebar_lists_every_lesson_in_order_on_every_page(site):
    want = [p.stem + ".html" for p in lessons()]
    for page in ["index.html"] + want:
        nav = soup(site, page).select_one("nav#docs-nav")
        assert nav is not None, f"{page} has no sidebar"
        assert [a["href"] for a in nav.select("ol a")] == want, f"{page}: sidebar lessons differ from the course order"
        assert nav.select_one("a.docs-home")["href"] == "index.html"
        current = [a["href"] for a in nav.select('a[aria-current="page"]')]
        assert current == [page], f"{page}: sidebar marks {current} as the current page"
    titles = [a.get_text(" ", strip=True) for a in soup(site, "index.html").select("nav#docs-nav ol a")]
    first_md = "".join(cells(lessons()[0])[0]["source"])
    assert titles[0].split(" ", 1)[1] in first_md.replace("`", "")  # "00 Common utilities": the lesson's own title


def test_nothing_external_is_loaded(site):
    "No page or stylesheet pulls a script, style, font or image from the network (no CDN): they must work offline."
    external = re.compile(r"^(https?:)?//", re.I)
    for page in site.glob("*.html"):
        s = soup(site, page.name)
        for tag, attr in [("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src")]:
            for el in s.find_all(tag):
                assert not external.match(el.get(attr, "")), f"{page.name} loads {el.get(attr)}"
        styles = " ".join(st.get_text() for st in s.find_all("style"))
        assert not re.search(r"(@import|url\()\s*['\"]?(https?:)?//", styles), f"{page.name}: external CSS in a <style>"
    css = (site / "docs.css").read_text()
    assert not re.search(r"(@import|url\()\s*['\"]?(https?:)?//", css), "docs.css imports something from the network"


def test_hidden_cells_and_directives_are_gone(site):
    checked_hidden = checked_export = 0
    for nb in lessons():
        page = soup(site, nb.stem + ".html")
        shown = [squash(t) for t in code_texts(page)]
        assert shown, f"{nb.name}: no code cells on the page"
        assert not any(DIRECTIVE.search(t) for t in code_texts(page)), f"{nb.name}: a `#|` directive line is shown"
        for c in cells(nb):
            if c["cell_type"] != "code": continue
            d, body = directives(c), squash(body_of(c))
            if not body: continue
            if "hide" in d or "default_exp" in d:
                assert not any(body in s for s in shown), f"{nb.name}: a hidden cell is shown:\n{body_of(c)[:200]}"
                checked_hidden += 1
            elif "export" in d:
                assert body in shown, f"{nb.name}: an exported cell is missing:\n{body_of(c)[:200]}"
                checked_export += 1
        n_export = sum("export" in directives(c) for c in cells(nb) if c["cell_type"] == "code")
        assert len(page.select(".docs-export")) == n_export, f"{nb.name}: not every exported cell has its badge"
    assert checked_hidden > 10 and checked_export > 10  # so that the checks above can't pass on nothing


def test_links_between_lessons_point_to_pages(site):
    index = soup(site, "index.html")
    hrefs = [a["href"] for a in index.select("main a[href]")]
    assert not [h for h in hrefs if h.endswith(".ipynb") and (NBS / h).exists()], "index links to notebooks, not pages"
    linked = {h for h in hrefs if h.endswith(".html")}
    assert {p.stem + ".html" for p in lessons()} <= linked, "the home page's lesson map misses lessons"
    assert all((site / h).exists() for h in linked)


TEX = re.compile(r"\$[^$\n]*\\(frac|log|sum|top|text|ln|in|approx|varphi)[^$\n]*\$")  # $...$ with a TeX command


def test_math_is_rendered_without_a_script(site):
    "Lessons with $...$ math get MathML (drawn by the browser itself), and no TeX is left in their prose."
    prose_md = lambda nb: " ".join(re.sub(r"`[^`]*`", "", "".join(c["source"])) for c in cells(nb) if c["cell_type"] == "markdown")
    with_math = [nb for nb in lessons() if TEX.search(prose_md(nb))]
    if not with_math: pytest.skip("no lesson has math")
    for nb in with_math:
        page = soup(site, nb.stem + ".html")
        assert page.find("math"), f"{nb.name}: its math was not converted to MathML"
        prose = " ".join(d.get_text() for d in page.select(".jp-MarkdownOutput"))
        assert not re.search(r"\\(frac|log|sum|top|text)", prose), f"{nb.name}: raw TeX left in the prose"


@pytest.fixture(scope="module")
def server(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: `apt-get install -y chromium`")
def test_site_in_a_browser(site, server):
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    # the lesson to click through to: the first one with math, so that the screenshot shows MathML too
    target = next((nb for nb in lessons() if soup(site, nb.stem + ".html").find("math")), lessons()[0]).stem + ".html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860}, color_scheme="light")
        page.set_default_timeout(15_000)
        outside, errors = [], []
        def route(r):  # anything not on our loopback server would be a CDN dependency: record it and refuse it
            if urlparse(r.request.url).netloc != urlparse(server).netloc and not r.request.url.startswith("data:"):
                outside.append(r.request.url); r.abort()
            else: r.continue_()
        page.route("**/*", route)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        page.goto(f"{server}/index.html")
        home_title, home_h1 = page.title(), page.locator("main h1").first.inner_text()
        assert home_h1.startswith("nanochat")
        nav = page.locator("#docs-nav")
        assert nav.evaluate("e => getComputedStyle(e).position") == "fixed", "docs.css did not load (sidebar not fixed)"
        assert nav.locator("ol a").count() == len(lessons())
        page.screenshot(path=str(ARTIFACTS / "docs_home.png"))

        link = nav.locator(f'ol a[href="{target}"]')
        want_h1 = soup(site, target).select_one("main h1").get_text().replace("¶", "").strip()
        link.click()
        page.wait_for_url(f"**/{target}")
        assert page.title() != home_title and want_h1 in page.title().replace("`", "")
        assert page.locator("main h1").first.inner_text().replace("¶", "").strip() == want_h1
        assert page.locator('#docs-nav a[aria-current="page"]').get_attribute("href") == target
        if page.locator("math").count():  # MathML is laid out by the browser: it has a size
            assert page.locator("math").first.bounding_box()["width"] > 5
        code = page.locator(".jp-CodeCell .highlight").first
        assert code.bounding_box()["width"] > 300, "code cells did not render"
        page.screenshot(path=str(ARTIFACTS / "docs_lesson.png"))

        page.locator('#docs-nav a.docs-home').click()  # and back home through the sidebar
        page.wait_for_url("**/index.html")
        assert page.title() == home_title
        browser.close()
    assert not outside, f"pages tried to load from outside: {outside[:5]}"
    assert not errors, f"errors in the browser console: {errors[:5]}"
