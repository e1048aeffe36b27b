"""xvila demo: every task pair on held-out scenes as a self-contained, escaped HTML gallery of valid media files."""

import json
from html.parser import HTMLParser

import pytest

from xvila.cli import load_model, main
from xvila.demo import DemoCase, DemoConfig, DemoTurn, SavedMedia, render_html, write_demo
from xvila.media import load_media
from xvila.modalities import modality_of_path

ISSUE_CASES = ("text->image", "text->video", "text->audio", "image->text", "video->text", "audio->text",
               "image->video", "image->audio", "video->image", "video->audio", "audio->image", "audio->video",
               "image+audio->video", "multi-turn edit")
TAG_MODALITY = {"img": "image", "video": "video", "audio": "audio"}


class Page(HTMLParser):
    """Tags, media sources and text of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.media, self.text, self.external = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag in TAG_MODALITY:
            self.media.append((TAG_MODALITY[tag], attrs["src"]))
        if tag in ("link", "script") or "://" in (attrs.get("src") or "") + (attrs.get("href") or ""):
            self.external.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "gallery"
    assert main(["demo", "--model", "tiny-random", "--out", str(out), "--steps", "1", "--max-new-tokens", "4"]) == 0
    return out


def test_cli_writes_every_case_with_valid_media(demo_dir):
    model = load_model("tiny-random")
    page = parse((demo_dir / "index.html").read_text())
    assert not page.external  # self-contained: no scripts, stylesheets or remote media
    text = "".join(page.text)
    record = json.loads((demo_dir / "demo.json").read_text())
    assert [c["name"] for c in record["cases"]] == list(ISSUE_CASES)
    for name in ISSUE_CASES:
        assert name in text
    assert len(record["cases"][-1]["turns"]) == 2  # the edit is a conversation

    json_paths = {m["path"] for c in record["cases"] for t in c["turns"]
                  for m in t["inputs"] + t["outputs"] + t["reference_media"]}
    assert {src for _, src in page.media} == json_paths
    for modality, src in page.media:
        assert not src.startswith("/")  # relative
        assert modality_of_path(src).name == modality
        data = load_media(demo_dir / src, modality, **model.media_sizes(modality))
        assert data.numel() > 0

    by_name = {c["name"]: c["turns"] for c in record["cases"]}
    for name in ISSUE_CASES[:-1]:
        (turn,) = by_name[name]
        source, target = name.split("->")
        assert sorted(m["modality"] for m in turn["inputs"]) == sorted(m for m in source.split("+") if m != "text")
        if target != "text":
            assert target in [m["modality"] for m in turn["outputs"]]  # the requested output is forced
        assert turn["reference"]


def test_page_escapes_text(demo_dir):
    html_text = (demo_dir / "index.html").read_text()
    assert "&lt;video 0&gt;" in html_text and "<video 0>" not in html_text  # answer markers are text, not tags
    nasty = DemoTurn('<script>alert("x")</script> & <b>', [], "<img src=x onerror=alert(1)>",
                     [SavedMedia("image", 'a"b/<c>.png', "<image 0>")], "</td></table>")
    page_text = render_html([DemoCase("<i>case</i>", "test-000000", "a & b", [nasty])], "<t>", DemoConfig())
    page = parse(page_text)
    assert page.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "a", "section", "table",
                         "tr", "th", "td", "div", "img"}
    assert "script" not in page.tags and "b" not in page.tags and "i" not in page.tags
    assert page.media == [("image", 'a"b/<c>.png')]
    assert '<script>alert("x")</script> & <b>' in "".join(page.text)


def test_same_seed_same_demo(tmp_path):
    config = DemoConfig(seed=1, max_new_tokens=4, num_inference_steps=1, cases=("audio->text", "multi-turn edit"))
    records = []
    for run in ("a", "b"):
        write_demo(load_model("tiny-random"), tmp_path / run, config)
        record = json.loads((tmp_path / run / "demo.json").read_text())
        png = (tmp_path / run / record["cases"][1]["turns"][1]["outputs"][0]["path"]).read_bytes()
        records.append((record, png))
    assert records[0] == records[1]
    assert records[0][0]["cases"][0]["scene"] != "test-000005"  # another seed, other scenes


@pytest.mark.parametrize("setup, argv, message", [
    ("file", ["--out", "{dir}/taken"], "not a folder"),
    ("file", ["--out", "{dir}/taken/sub"], "cannot create the folder"),
    (None, ["--out", "{dir}/o", "--seed", "-1"], "seed"),
    (None, ["--out", "{dir}/o", "--model", "{dir}/no_model"], "not a model folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, setup, argv, message):
    if setup == "file":
        (tmp_path / "taken").write_text("not a folder")
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    assert main(["demo", "--model", "tiny-random", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xvila: error:") and message in err[0]
