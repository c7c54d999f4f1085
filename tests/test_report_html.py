"""report.html in a real browser (headless Chromium, Debian's `chromium`; .ci/run installs it): the page renders
(not blank), references nothing outside itself, and no two texts on it overlap -- at desktop and phone width."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipelines.compare import compare_heads
from pipelines.report import write_results

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
               None)

# Injected into a copy of the page: every pair of texts whose boxes intersect (by more than a sliver), among the
# HTML's text nodes (their own extents, not their elements') and, per plot, matplotlib's text groups.
CHECKER = """
<script>
(function () {
  function area(a, b) {
    var w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
    var h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
    return w > 0 && h > 0 ? w * h : 0;
  }
  var problems = [], texts = [];
  var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (var node = walker.nextNode(); node; node = walker.nextNode()) {
    var parent = node.parentElement;
    if (!node.textContent.trim() || parent.closest("script, style, svg")) continue;
    var range = document.createRange();
    range.selectNodeContents(node);
    Array.prototype.forEach.call(range.getClientRects(), function (r) {
      if (r.width > 0 && r.height > 0) texts.push({rect: r, text: node.textContent.trim().slice(0, 40)});
    });
  }
  for (var i = 0; i < texts.length; i++)
    for (var j = i + 1; j < texts.length; j++)
      if (area(texts[i].rect, texts[j].rect) > 2) problems.push([texts[i].text, texts[j].text]);
  document.querySelectorAll("svg").forEach(function (svg) {
    var groups = Array.prototype.filter.call(svg.querySelectorAll('g[id*="-text_"]'), function (g) {
      return !g.querySelector('g[id*="-text_"]');
    });
    var boxes = groups.map(function (g) { return g.getBoundingClientRect(); });
    for (var i = 0; i < boxes.length; i++)
      for (var j = i + 1; j < boxes.length; j++)
        if (area(boxes[i], boxes[j]) > 2) problems.push([groups[i].id, groups[j].id]);
  });
  var out = document.createElement("pre");
  out.id = "overlap-result";
  out.textContent = JSON.stringify({texts: texts.length, problems: problems.slice(0, 20), count: problems.length});
  document.body.appendChild(out);
})();
</script>
"""


def assert_self_contained(html: str) -> None:
    """Nothing fetched from elsewhere: no src/href to another document, no CSS url() or @import outside the page."""
    assert not re.findall(r"""(?:src|href)\s*=\s*["'](?!#|data:)""", html)
    assert not re.findall(r"url\((?!#|data:)", html) and "@import" not in html


def assert_renders_without_overlaps(page, tmp_path, width: int, min_texts: int) -> None:
    """`page` in headless Chromium at `width`: ink on it, more than flat colour, at least `min_texts` texts, and no
    two of them (or of the plots' labels) overlapping."""
    shot = tmp_path / f"{page.stem}-{width}.png"
    done = _browser(f"--window-size={width},2000", f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert (pixels < 240).any(axis=2).mean() > 0.02  # ink on the page, not a blank screen
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and pictures, not one flat colour

    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECKER + "</body>"))
    done = _browser(f"--window-size={width},2000", "--dump-dom", checked.as_uri())
    found = re.search(r'<pre id="overlap-result">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stderr[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["texts"] > min_texts and result["count"] == 0, result


@pytest.fixture(scope="module")
def report(digits_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    comparison = compare_heads([digits_tiny], ["logreg", "knn", "ridge", "centroid", "lda"], n_boot=200,
                               shots=[2, "all"], seeds=2, progress=False)
    write_results(comparison, out, command="python cli.py compare-heads digits.h5 --shots 2,all --seeds 2")
    return out / "report.html"


def test_the_page_holds_everything_it_shows(report):
    html = report.read_text()
    assert_self_contained(html)
    for part in ("<svg", "Leaderboard", "Learning curve", "Calibration", "Cost and budget", "class by class",
                 "Provenance", "python cli.py compare-heads digits.h5", "config_hash", "≈" if "tie" in html else ""):
        assert part in html, part


def _browser(*args, timeout=90):
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("width", [1280, 390])  # desktop, and a phone
def test_the_page_renders_and_nothing_on_it_overlaps(report, tmp_path, width):
    assert_renders_without_overlaps(report, tmp_path, width, min_texts=100)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
def test_the_overlap_check_sees_overlaps(tmp_path):
    """The check above can fail: two HTML texts on one spot, and two plot labels on one spot, are both found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.html_report import inline_svg

    def crowded(_comparison, target, fmt=None):
        fig, ax = plt.subplots()
        ax.plot([1, 1.02], [1, 1.01], "o")
        ax.annotate("torch-logreg", (1, 1))
        ax.annotate("rbf-svm", (1.0005, 1.0003))  # the labels of accuracy_vs_fit_time.png before placement
        fig.savefig(target, format=fmt)
        plt.close(fig)

    svg = inline_svg(crowded, None, "t")
    page = tmp_path / "crowded.html"
    page.write_text(f'<html><body><p style="position:absolute;top:10px">one text</p>'
                    f'<p style="position:absolute;top:14px">another text</p><div style="margin-top:80px">{svg}</div>'
                    f'{CHECKER}</body></html>')
    done = _browser("--dump-dom", page.as_uri())
    result = json.loads(re.search(r'<pre id="overlap-result">(.*?)</pre>', done.stdout, re.S).group(1)
                        .replace("&quot;", '"'))
    assert ["one text", "another text"] in result["problems"]
    assert any(a.startswith("t-text_") and b.startswith("t-text_") for a, b in result["problems"]), result


def test_fit_time_axis_labels_only_whole_decades():
    """Fit times within a decade or two made matplotlib label minor ticks (2x10^-2, 3x10^-2, ...), and neighbouring
    labels overlapped on the page in one CI run; the axis now spans whole decades and labels only them."""
    import io
    import types

    from pipelines.plots import plot_accuracy_vs_fit_time

    for low, high in [(0.02, 0.05), (0.0031, 0.0047), (0.05, 0.6), (1e-4, 30.0)]:
        rows = [{"representation": "r", "head": f"h{i}", "fit_seconds": x, "accuracy": 0.9 + i / 100,
                 "accuracy_ci": [0.88 + i / 100, 0.92 + i / 100]} for i, x in enumerate(np.geomspace(low, high, 5))]
        buffer = io.BytesIO()
        plot_accuracy_vs_fit_time(types.SimpleNamespace(rows=rows), buffer, fmt="svg")
        ticks = re.findall(r"<!-- \$\\mathdefault\{(.*?)\}\$ -->", buffer.getvalue().decode())
        assert ticks and all(re.fullmatch(r"10\^\{-?\d+\}", t) for t in ticks), ticks
