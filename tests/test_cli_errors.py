"""Errors for people (issue 15, problem 4): one line naming the thing and the fix, exit 1 for a failed
job and 2 for a usage error, the traceback only with --debug."""
import dataclasses
import json
import urllib.error

import pytest
from PIL import Image

from detrkit import cli
from detrkit.config import get_preset
from detrkit.detector import Detector
from detrkit.weights import hub


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _offline(monkeypatch, tmp_path):
    def no_network(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub, "download_url_to_file", no_network)
    monkeypatch.setenv("DETRKIT_CACHE", str(tmp_path / "cache"))


def test_offline_download_says_which_file_to_place_where(monkeypatch, tmp_path, capsys):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(hub.DownloadError) as e:
        Detector.from_pretrained("detr-r50")
    expected = str(tmp_path / "cache" / "detr-r50-e632da11.pth")
    assert expected in str(e.value) and "detr-r50-e632da11.pth" in str(e.value)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    rc, out, err = _run(capsys, "predict", "--weights", "detr-r50", str(tmp_path / "a.jpg"), "--out",
                        str(tmp_path / "pred"))
    assert rc == 1
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err


def test_bad_weights_path_is_one_line(tmp_path, capsys):
    rc, out, err = _run(capsys, "eval", "--weights", str(tmp_path / "nope"), "--data", str(tmp_path / "x.json"))
    assert rc == 1 and "nope" in err and err.count("\n") == 1 and "Traceback" not in err


def test_empty_training_set_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    rc, out, err = _run(capsys, "train", "--data", str(tmp_path / "empty.json"), "--out", str(tmp_path / "run"),
                        "--device", "cpu")
    assert rc == 1 and "empty.json" in err and err.count("\n") == 1


def test_export_hf_of_a_non_exportable_preset_is_one_line(tmp_path, capsys):
    # queries at the decoder input (paper Table 3) have no Hugging Face equivalent
    cfg = dataclasses.replace(get_preset("detr-tiny").model.with_classes(["a"]), queries_at="input")
    Detector.from_config(cfg).save_pretrained(tmp_path / "w")
    rc, out, err = _run(capsys, "export", "hf", "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "hf"))
    assert rc == 1 and "queries" in err and err.count("\n") == 1


def test_usage_error_exits_2_and_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--no-such-flag"])
    assert e.value.code == 2
    capsys.readouterr()
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "eval", "--weights", str(tmp_path / "nope"), "--data", str(tmp_path / "x.json")])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("detrkit ")
