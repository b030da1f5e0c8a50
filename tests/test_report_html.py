"""``report.html`` of ``prunebench compare --out``: one self-contained file, checked as a browser renders it.

The report is made from the hand-logged MLflow store of test_compare.py. A headless Chromium opens a copy
into which this test injects a small checker script (the report itself has none): on ``load`` it counts the
images that decoded and the rows of each table, and writes them into the DOM that ``--dump-dom`` prints.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_compare import N_ROWS, Store, _html_tables, store  # noqa: F401  (store: the module's fixture)

from prunebench import cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHECKER = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const check = {
    images: images.length,
    loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    rows: [...document.querySelectorAll("table")].map((t) => t.rows.length),
  };
  const pre = document.createElement("pre");
  pre.id = "check";
  pre.textContent = JSON.stringify(check);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def report(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The folder ``prunebench compare --out`` wrote for the latest invocation of the hand-logged store."""
    out = tmp_path_factory.mktemp("report")
    assert cli.main(["compare", "--tracking-uri", store.uri, "--out", str(out), "-q", "--no-log"]) == 0
    return out


def _pngs(out: Path) -> list[Path]:
    return sorted(out.rglob("*.png"))


def test_report_is_one_file_with_every_plot_inlined(report: Path) -> None:
    page = (report / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)  # nothing fetched from outside
    assert "url(" not in page and "@import" not in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', page)
    pngs = _pngs(report)
    assert len(pngs) >= 3 and len(images) == len(pngs)
    assert sorted(base64.b64decode(data) for data, _ in images) == sorted(p.read_bytes() for p in pngs)
    assert all(alt.strip() for _, alt in images)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert len(captions) == len(pngs)
    for png in pngs:
        assert any(f"({png.relative_to(report).as_posix()})" in html.unescape(c) for c in captions)
    assert len(_html_tables(page)[0]) == N_ROWS + 1  # the comparison table: header + rows
    assert "Best per target" in page and "Notes" in page


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip(
        f"no headless browser ({', '.join(BROWSERS)}) on PATH: install one to render report.html, e.g. "
        "`apt-get install chromium` (Debian)"
    )


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    browser = _browser()
    page = (report / "report.html").read_text(encoding="utf-8")
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECKER + "</body>", 1), encoding="utf-8")
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--virtual-time-budget=10000",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    found = re.search(r'<pre id="check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no checker output (exit {done.returncode}): {done.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    n_pngs = len(_pngs(report))
    assert check["images"] == n_pngs >= 1
    assert check["loaded"] == n_pngs  # every embedded image decoded
    assert check["rows"][0] == N_ROWS + 1  # the comparison table: header + one row per method and target
