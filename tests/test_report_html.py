"""`sparsify report --format html`: one self-contained page (structure read back with html.parser:
title, sections, one table row per layer, inline PNGs, no external URL), escaping of what comes from
files, sections the page does not know, the page without matplotlib, and a real browser's rendering."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html import escape
from html.parser import HTMLParser

import pytest

from conftest import invoke
from report_run import colours, make_run
from sparsify.report.html import NO_PLOTS, render_html


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report-run"))


class Page(HTMLParser):
    """What the tests check of a page: title, section ids, rows per table id, image sources, every
    src/href, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.title, self.sections, self.rows, self.images, self.links, self.scripts = "", [], {}, [], [], []
        self._in_title, self._table, self._in_body = False, None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_title = tag == "title"
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "table":
            self._table = attrs.get("id")
            self.rows[self._table] = 0
        self._in_body = tag == "tbody" or self._in_body
        if tag == "tr" and self._in_body:
            self.rows[self._table] += 1
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "script":
            self.scripts.append(attrs)
        self.links += [value for key, value in attrs.items() if key in ("src", "href")]

    def handle_endtag(self, tag):
        self._in_title = False if tag == "title" else self._in_title
        self._in_body = False if tag == "tbody" else self._in_body

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def report_json(run) -> dict:
    code, out, err = invoke("report", run, "-f", "json")
    assert code == 0, err
    return json.loads(out)


def test_the_page_has_the_sections_one_row_per_layer_and_inline_figures_only(run, tmp_path):
    target = tmp_path / "report.html"
    code, out, err = invoke("report", run, "-f", "html", "-o", target)
    assert (code, out) == (0, "") and err == f"wrote {target}\n"
    text = target.read_text()
    page = Page(text)
    report = report_json(run)
    assert page.title == "sparsify report: tiny_resnet 003-r01-trained.safetensors"
    assert page.sections == ["summary", "history", "rounds", "figures", "layers", "config"]
    assert page.rows["layer-table"] == len(report["layers"]) == 10
    assert len(page.images) == 7  # rounds, layers, training and the four largest masks
    for src in page.images:
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert src.startswith("data:image/png;base64,") and png.startswith(b"\x89PNG") and colours(png) >= 5
    assert all(link.startswith(("data:", "#")) for link in page.links)
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert page.scripts == [{}]  # one inline script (the table sort), nothing loaded
    assert 'class="sortable"' in text and "name: tiny" in text  # the run's config.yaml
    outcome = f"final: 50.00% of eligible weights zero, top-1 {report['outcome']['val_acc1']:.2f}%"
    assert outcome in text


def test_what_comes_from_files_is_escaped(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    with open(copy / "config.yaml", "a") as f:
        f.write("# <script>alert('x')</script> & <img src=http://example.com/x.png>\n")
    code, out, err = invoke("report", copy, "-f", "html")
    assert code == 0, err
    assert out.startswith("<!DOCTYPE html>")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;img src=http://example.com" in out
    page = Page(out)
    assert page.scripts == [{}] and not any("example.com" in link for link in page.links)


def test_sections_the_page_does_not_know_are_tables(run):
    report = report_json(run)
    report["future"] = [{"layer": "<b>a</b>", "value": 1.5}, {"layer": "c", "extra": [1, 2]}]
    report["settings"] = {"mode": "<fast>"}
    report["empty"] = []
    page_text = render_html(report, figures=None)
    page = Page(page_text)
    assert "extra-future" in page.sections and "extra-settings" in page.sections
    assert "extra-empty" not in page.sections
    assert "&lt;b&gt;a&lt;/b&gt;" in page_text and "&lt;fast&gt;" in page_text and "[1, 2]" in page_text
    assert "<th class=\"text\">extra</th>" in page_text  # the columns are every key of the records


def test_without_matplotlib_the_page_says_figures_need_the_plot_extra(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, out, err = invoke("report", run, "-f", "html")
    assert code == 0, err
    page = Page(out)
    assert escape(NO_PLOTS) in out and page.images == [] and page.rows["layer-table"] == 10


def test_output_file_refusals_and_other_formats(run, tmp_path):
    code, out, err = invoke("report", run, "-f", "html", "-o", tmp_path)
    assert (code, out) == (1, "") and err.startswith(f"error: -o {tmp_path} is a folder")
    code, _, err = invoke("report", run, "-o", tmp_path / "missing" / "r.html")
    assert code == 1 and "does not exist; create it first" in err and not (tmp_path / "missing").exists()
    code, table, _ = invoke("report", run)
    code, _, err = invoke("report", run, "-o", tmp_path / "report.txt")
    assert code == 0 and (tmp_path / "report.txt").read_text() == table


@pytest.mark.slow
def test_a_browser_renders_the_page(run, tmp_path):
    """Headless Chromium (Debian's chromium package) draws the page: a screenshot with several colours."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from PIL import Image

    page = tmp_path / "report.html"
    code, _, err = invoke("report", run, "-f", "html", "-o", page)
    assert code == 0, err
    shot = tmp_path / "shot.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1200,2000", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    png = shot.read_bytes()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (1200, 2000)
    assert colours(png) >= 50  # text, tables and the figures' colours, not a blank page
    top = image.crop((0, 0, 1200, 600))  # the title, outcome and summary: dark text on white
    assert min(top.getextrema()[0][0], 255) < 80
