"""``dscl report``: one self-contained HTML page comparing runs, checked by parsing it."""

import base64
import io
import json
import shutil
from html.parser import HTMLParser

from PIL import Image

from dscl.cli import main


class Page(HTMLParser):
    """Images, table cells (per table) and every attribute that could fetch something."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.links, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self._cell = ""
        for name in ("href", "src"):
            if name in attrs and tag != "img":
                self.links.append(attrs[name])
        if tag in ("script", "link", "iframe"):
            self.links.append(tag)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None


def _parse(path):
    page = Page()
    page.feed(path.read_text())
    return page


def test_page_embeds_every_figure_and_the_numbers_of_each_run(scl_run, ce_run, tmp_path):
    extra = scl_run / "analyses" / "extra.png"
    extra.parent.mkdir(exist_ok=True)
    Image.new("RGB", (20, 10), (0, 128, 0)).save(extra)
    out = tmp_path / "report.html"
    assert main(["report", str(scl_run), str(ce_run), "--out", str(out)]) == 0
    page = _parse(out)
    assert page.links == []  # nothing to fetch: no script, stylesheet link, or external image
    assert len(page.images) >= 3  # per-class, curves, the extra figure
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG"
        image.verify()
    results_table, config_table = page.tables[0], page.tables[1]
    header = results_table[0]
    rows = {row[0]: dict(zip(header, row)) for row in results_table[1:]}
    for run in (scl_run, ce_run):
        results = json.loads((run / "results.json").read_text())
        row = next(r for name, r in rows.items() if name.endswith(run.name))
        assert row["method"] == results["method"]
        for key, label in [("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("overall", "Overall"),
                           ("val_top1", "val")]:
            expected = "\u2013" if results[key] is None else f"{results[key]:.2f}"
            assert row[label] == expected, (run.name, key)
    differing = [row[0] for row in config_table[1:]]
    assert "method" in differing and "seed" not in differing


def test_a_run_without_results_still_gets_a_row(scl_run, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(scl_run / "config.yaml", partial)
    out = tmp_path / "r.html"
    assert main(["report", str(partial), "--out", str(out)]) == 0
    page = _parse(out)
    assert page.tables[0][1][-1] == "no results.json yet"
    assert page.images == []


def test_an_empty_folder_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "holds no dscl run (the folder is empty)" in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()
