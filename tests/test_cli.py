"""The xvila command line: one-turn generation, chat, and one-line errors for bad input."""

import io
import json

import pytest
import torch

from xvila.cli import main
from xvila.media import save_audio, save_image


@pytest.fixture
def media_files(tmp_path):
    save_image(tmp_path / "in.png", torch.rand(3, 40, 30))
    save_audio(tmp_path / "in.wav", torch.sin(torch.arange(16000) / 16000 * 2 * torch.pi * 440) * 0.5)
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "notes.txt").write_text("hello")
    return tmp_path


def test_generate_json_writes_requested_media(media_files, capsys):
    out = media_files / "out"
    rc = main(["generate", "--model", "tiny-random", "--prompt", "a video please",
               "--image", str(media_files / "in.png"),
               "--audio", str(media_files / "in.wav"), "--outputs", "video,image", "--steps", "2",
               "--max-new-tokens", "4", "--out", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(f["modality"] for f in result["files"]) == ["image", "video"]
    for f in result["files"]:
        assert (out / f["path"].split("/")[-1]).stat().st_size > 0
        assert f["marker"] in result["text"]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "   "], "empty"),
    (["--prompt", "x", "--image", "missing.png"], "file not found"),
    (["--prompt", "x", "--image", "{dir}/bad.png"], "bad.png"),
    (["--prompt", "x", "--image", "{dir}/in.wav"], "unsupported"),
    (["--prompt", "x", "--outputs", "smell"], "cannot generate 'smell'"),
    (["--prompt", "x", "--model", "{dir}/no_model"], "not a model folder"),
])
def test_generate_bad_input_is_one_line_and_exit_2(media_files, capsys, argv, message):
    argv = [a.replace("{dir}", str(media_files)) for a in argv]
    assert main(["generate", "--model", "tiny-random", *argv, "--out", str(media_files / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xvila: error:") and message in err[0]


def test_chat_keeps_going_after_bad_input(media_files, capsys, monkeypatch):
    lines = f"hello @{media_files}/in.png\n@{media_files}/notes.txt hi\n/reset\nand now @{media_files}/in.wav\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", "--model", "tiny-random", "--max-new-tokens", "3", "--steps", "2", "--out",
                 str(media_files / "chat")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("xvila> ") == 2
    assert "cannot tell the modality" in captured.err
    assert "(conversation cleared)" in captured.out
