"""``report.html`` of ``prunebench compare --out``: the whole comparison in one file that can be mailed,
attached or opened offline -- the title and selection, the table, the verdicts and notes (the HTML of
:mod:`~prunebench.commands.compare.rendering`) and every PNG plot written, embedded as a ``data:`` URI.

The page has no script and no external reference (no stylesheet, font or image fetched), so it renders the
same wherever it is opened.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from prunebench.commands.compare.rendering import HTML_STYLE, html_body, html_page, title
from prunebench.commands.compare.report import Comparison
from prunebench.files import atomic_write_text

REPORT_FILE = "report.html"
_FIGURE_STYLE = "figure{margin:1.5em 0} figure img{max-width:100%;height:auto} figcaption{color:#444}"
_CAPTIONS = {  # file name -> what the figure shows (plots.py draws them)
    "tradeoff.png": "Test top-1 against achieved MACs: one line per method across targets, error bars = sample "
    "sd over seeds; the dense model (star) and the dense model trained for the same epochs (diamond) as references",
    "layers.png": "Remaining output channels per layer at one target, mean over seeds, against the dense widths: "
    "where each method prunes",
    "sparsity_norms.png": "Sorted channel norms (relative to the layer's starting median) at the start and end of "
    "sparsity training, per regularized method: how many channels the regularizer drove toward zero",
}


def caption(rel: Path) -> str:
    """What the plot at ``rel`` (relative to the output folder) shows."""
    if rel.as_posix() in _CAPTIONS:
        return _CAPTIONS[rel.as_posix()]
    if rel.parent.name == "curves":
        return (
            f"Training curves of {rel.stem}: loss, penalty, validation top-1 and learning rate per epoch, stages shaded"
        )
    return rel.stem.replace("_", " ")


def figure_html(path: Path, rel: Path) -> str:
    """One ``<figure>``: the PNG at ``path`` inlined as base64, with alt text and a caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    text = html.escape(caption(rel))
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{text}">'
        f"<figcaption>{text} <code>({html.escape(rel.as_posix())})</code></figcaption></figure>\n"
    )


def to_report_html(comp: Comparison, out_dir: Path, plots: Sequence[Path]) -> str:
    """The page: the comparison's HTML, then each plot (paths under ``out_dir``) inlined in the order written."""
    figures = "".join(figure_html(p, p.relative_to(out_dir)) for p in plots)
    section = f"<h4>Plots</h4>\n{figures}" if figures else "<p>No plots were written (--no-plots).</p>\n"
    heading = f"prunebench compare: {title(comp)}"
    return html_page(heading, html_body(comp) + section, style=f"{HTML_STYLE} {_FIGURE_STYLE}")


def write_report(comp: Comparison, out_dir: Path, written: Sequence[Path]) -> Path:
    """Write ``out_dir/report.html`` with every PNG of ``written`` embedded; return its path."""
    plots = [p for p in written if p.suffix == ".png"]
    path = out_dir / REPORT_FILE
    atomic_write_text(path, to_report_html(comp, out_dir, plots))
    return path
