"""A corpus of hostile and broken inputs, run through the command line as a user would.

Each case builds its own input, runs `detrkit ...` in a child process (forked from this one, so the
command line is the real entry point without re-importing torch each time; one case also starts a
fresh interpreter) and asserts the exit code, a fragment of the message and the files left behind.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _train_helpers import tiny_data, tiny_model

from detrkit.data.coco import load_coco
from detrkit.weights.native import save_native


# ------------------------------------------------------------------------------------------ running
@dataclass
class Run:
    code: int
    output: str  # stdout and stderr together

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return f"Run(code={self.code}, output=...{self.output[-3000:]!r})"


def cli(*args: str | os.PathLike, timeout: float = 600) -> Run:
    """`detrkit ARGS` in a forked child (one torch thread): exit code as the interpreter would give it
    (an uncaught exception is 1 with a traceback), stdout + stderr as one text."""
    argv = [str(a) for a in args]
    r, w = os.pipe()
    out_fd, out_path = _tempfile()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            os.dup2(out_fd, 1)
            os.dup2(out_fd, 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
            logging.root.handlers.clear()  # pytest's capture handlers: let the CLI configure its own
            # OpenMP's thread team does not survive fork(): a parallel region in the child would wait for
            # threads that exist only in the parent (the DataLoader's workers do the same)
            torch.set_num_threads(1)
            from detrkit.cli import main

            try:
                code = int(main(argv) or 0)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(r)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    os.close(out_fd)
    text = Path(out_path).read_text(errors="replace")
    os.unlink(out_path)
    return Run(os.waitstatus_to_exitcode(status), text)


def _tempfile() -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="detrkit-cli-", suffix=".log")


def cli_subprocess(*args: str | os.PathLike, timeout: float = 600) -> Run:
    """`python -m detrkit.cli ARGS` in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-m", "detrkit.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return Run(p.returncode, p.stdout + p.stderr)


def no_traceback(run: Run) -> bool:
    return "Traceback (most recent call last)" not in run.output


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> Path:
    """4 synthetic 64x64 PNGs with boxes (COCO JSON)."""
    return tiny_data(tmp_path_factory.mktemp("coco"), 4)


@pytest.fixture(scope="module")
def weights(coco_set, tmp_path_factory) -> Path:
    """Untrained tiny model for coco_set's classes, saved natively."""
    index = load_coco(coco_set)
    cfg = tiny_model().with_classes(index.class_names, index.category_ids)
    from detrkit.model import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_native(build_model(cfg).state_dict(), cfg, path)
    return path


# ------------------------------------------------------------------------------- 1. code execution
class _Payload:
    """Unpickling this creates (opens for writing) the marker file: code run from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(path: Path, marker: Path, weights: Path, version: int) -> Path:
    """A checkpoint that would load (config, model weights) with a payload alongside, behind a header
    of format `version` whose checksum is right: the checksum proves nothing about safety."""
    from detrkit.weights.native import load_native

    sd, cfg = load_native(weights)
    state = {"model_cfg": cfg.to_dict(), "model": sd, "ema": None, "payload": _Payload(marker)}
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    header = f"DETRKIT-CKPT {version} ".encode() + hashlib.sha256(body).hexdigest().encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body)
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_pickle_payload_never_runs_through_any_command(tmp_path, coco_set, weights, version):
    marker = tmp_path / "PWNED"
    run_dir = tmp_path / "run"
    evil = _evil_checkpoint(run_dir / "last.pt", marker, weights, version)
    bare = tmp_path / "evil.pt"  # the same payload without our header, as a .pt / .pth file
    buf = io.BytesIO()
    torch.save({"model": {"class_embed.weight": torch.zeros(2, 2)}, "payload": _Payload(marker)}, buf)
    bare.write_bytes(buf.getvalue())
    image = next((coco_set.parent / "images").iterdir())
    commands = {
        "eval --weights X.pt": ("eval", "--weights", evil, "--data", coco_set, "--device", "cpu"),
        "eval --weights RUN_DIR": ("eval", "--weights", run_dir, "--data", coco_set, "--device", "cpu"),
        "predict --weights X.pt": ("predict", image, "--weights", evil, "--no-progress", "--json", tmp_path / "p.json"),
        "predict --weights bare.pt": ("predict", image, "--weights", bare, "--no-progress", "--json", tmp_path / "p.json"),
        "viz attention --weights": ("viz", "attention", image, "--weights", evil, "--out", tmp_path / "a.png"),
        "viz queries --weights": ("viz", "queries", "--weights", evil, "--data", coco_set, "--out",
                                  tmp_path / "q.png"),
        "export onnx --weights": ("export", "onnx", "--weights", evil, "--out", tmp_path / "m.onnx"),
        "export hf --weights": ("export", "hf", "--weights", bare, "--out", tmp_path / "hf"),
        "train --weights": ("train", "--data", coco_set, "--out", tmp_path / "ft", "--weights", evil,
                            "--device", "cpu", "--max-steps", "1"),
        "train --resume": ("train", "--data", coco_set, "--out", run_dir, "--resume", "--device", "cpu",
                           "--max-steps", "1"),
        "viz masks --weights": ("viz", "masks", image, "--weights", evil, "--out", tmp_path / "m.png"),
    }
    for name, args in commands.items():
        run = cli(*args)
        assert not marker.exists(), f"{name}: the pickle payload ran"
        assert run.code != 0, f"{name}: exited 0 on a hostile checkpoint: {run}"
        named = bare.name if bare in args else evil.name
        assert named in run.output, f"{name}: the message does not name the file: {run}"
    # train-masks (not on the command line yet) loads its frozen detector the same way
    from detrkit.engine.checkpoint import CheckpointError
    from detrkit.engine.panoptic import load_panoptic_model

    for source in (evil, run_dir):
        with pytest.raises(CheckpointError, match="last.pt"):
            load_panoptic_model(source)
    assert not marker.exists()
    # and once in a fresh interpreter, exactly as the console script runs
    run = cli_subprocess("eval", "--weights", evil, "--data", coco_set, "--device", "cpu")
    assert not marker.exists() and run.code != 0
    assert "last.pt" in run.output and ("code" in run.output or "foreign" in run.output), run


def test_every_torch_load_is_weights_only():
    root = Path(__file__).resolve().parent.parent / "detrkit"
    calls = []
    for f in root.rglob("*.py"):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if "torch.load(" in line:
                calls.append((f"{f.name}:{n}", "weights_only=True" in line))
    assert calls and all(ok for _, ok in calls), calls


def test_checkpoint_round_trips_training_state_exactly(tmp_path):
    """Everything train.py stores comes back equal: RNG states (Python tuple, numpy array), optimizer
    state with int keys, None, nan, nested lists; and the file holds no pickle at all."""
    import random

    from detrkit.engine.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": None}
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": [rng], "order": [3, 1, 2],
             "best_ap": float("nan"), "metrics": {"AP": 0.25}, "ema": None, "step": 5,
             "shared": [model.weight, model.weight]}
    path = tmp_path / "last.pt"
    save_checkpoint(state, path)
    payload = path.read_bytes().split(b"\n", 1)[1]
    assert payload[8:9] == b"{" and not payload.startswith(b"PK")  # safetensors (JSON header), no pickle
    back = load_checkpoint(path)
    assert back["step"] == 5 and back["order"] == [3, 1, 2] and back["ema"] is None
    assert np.isnan(back["best_ap"]) and back["metrics"] == {"AP": 0.25}
    assert all(torch.equal(back["model"][k], v) for k, v in model.state_dict().items())
    assert torch.equal(back["shared"][0], back["shared"][1])
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # int keys and the betas tuple survive
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    r = back["rng"][0]
    assert r["python"] == rng["python"]
    random.setstate(r["python"])
    np.random.set_state(r["numpy"])
    torch.set_rng_state(r["torch"])
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_old_format_checkpoint_reads_through_the_safe_path(tmp_path):
    """A format-1 (pickle) checkpoint of plain data and numpy RNG arrays still loads, restricted."""
    import random

    from detrkit.engine.checkpoint import load_checkpoint

    state = {"model": {"w": torch.arange(3.0)}, "rng": [{"python": random.getstate(),
                                                       "numpy": np.random.get_state()}], "step": 3}
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    path = tmp_path / "old.pt"
    path.write_bytes(b"DETRKIT-CKPT 1 " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    back = load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["model"]["w"], torch.arange(3.0))
    assert np.array_equal(back["rng"][0]["numpy"][1], state["rng"][0]["numpy"][1])


# --------------------------------------------------------------------------------- 2. data corpus
def _png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _png_bomb(path: Path, w: int, h: int) -> Path:
    """A PNG whose header declares w x h pixels (1-bit gray) followed by a little valid data: a
    decompression bomb's header without the cost of writing one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + (w + 7) // 8) * 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _coco(root: Path, sizes: list[tuple[int, int]], boxes: bool = True, files: dict[int, str] | None = None
          ) -> Path:
    """COCO set: image i (1-based) of size sizes[i-1], one box each (the top-left quarter) unless
    boxes=False. files: image id -> file name to list instead of writing an image (for odd files)."""
    images, anns = [], []
    for i, (w, h) in enumerate(sizes, 1):
        name = (files or {}).get(i) or f"im{i}.png"
        if name == f"im{i}.png":
            _png(root / "images" / name, w, h, seed=i)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        if boxes:
            anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, max(1, w // 2), max(1, h // 2)],
                         "area": max(1, w // 2) * max(1, h // 2), "iscrowd": 0})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]}))
    return path


def _tiny_config(tmp_path: Path, **train) -> Path:
    """Settings that train the tiny model at 64 px on a CPU in seconds."""
    from _train_helpers import tiny_train

    model = {k: v for k, v in tiny_model().to_dict().items() if k not in ("class_names", "category_ids")}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"model": model, "train": {**tiny_train(pretrain_steps=0, **train).to_dict()}}))
    return path


def _yolo(root: Path, n: int = 3, labels: bool = True) -> Path:
    for i in range(n):
        _png(root / "images" / f"a{i}.png", 64, 48, seed=i)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        if labels:
            (root / "labels" / f"a{i}.txt").write_text("0 0.5 0.5 0.25 0.5\n1 0.2 0.2 0.1 0.1\n")
    return root


def test_yolo_labels_follow_the_path_as_written_not_the_symlink_target(tmp_path):
    store = _yolo(tmp_path / "store", 3)  # the real images live elsewhere, with their labels
    ds = tmp_path / "ds"
    (ds / "labels").mkdir(parents=True)
    for t in (store / "labels").iterdir():
        (ds / "labels" / t.name).write_text(t.read_text())
    (ds / "images").symlink_to(store / "images", target_is_directory=True)
    shutil_rm_labels = store / "labels"  # the target folder's own labels must not be the ones used
    for t in shutil_rm_labels.iterdir():
        t.unlink()
    shutil_rm_labels.rmdir()
    run = cli("data", "check", ds)
    assert run.code == 0 and "Boxes: 6 in 2 classes" in run.output, run
    out = tmp_path / "c.json"
    run = cli("data", "convert", ds, "--out", out)
    assert run.code == 0, run
    assert len(json.loads(out.read_text())["annotations"]) == 6


def test_yolo_set_without_any_label_file_fails_the_check(tmp_path):
    ds = _yolo(tmp_path / "ds", 3, labels=False)
    run = cli("data", "check", ds)
    assert run.code == 1 and "no label files" in run.output, run


def test_dataset_without_boxes_is_an_error_for_check_convert_train_and_a_warning_for_eval(tmp_path, weights):
    ann = _coco(tmp_path / "empty", [(64, 64), (64, 64)], boxes=False)
    run = cli("data", "check", ann)
    assert run.code == 1 and "no image has a box" in run.output, run
    run = cli("data", "convert", ann, "--out", tmp_path / "out.json")
    assert run.code == 1 and "no image has a box" in run.output and not (tmp_path / "out.json").exists(), run
    run = cli("train", "--data", ann, "--out", tmp_path / "run", "--config", _tiny_config(tmp_path),
              "--device", "cpu")
    assert run.code != 0 and "no image has a box" in run.output and not (tmp_path / "run" / "last.pt").exists()
    run = cli("eval", "--weights", weights, "--data", ann, "--device", "cpu")
    assert run.code == 0 and "WARNING" in run.output and "no image has a box" in run.output, run


def test_symlink_loop_is_a_counted_bad_sample_in_check_and_train(tmp_path):
    root = tmp_path / "loop"
    ann = _coco(root, [(64, 64), (64, 64), (64, 64)], files={3: "loop.png"})
    (root / "images" / "loop.png").symlink_to(root / "images" / "loop.png")
    run = cli("data", "check", ann)
    assert run.code == 1 and no_traceback(run) and "loop.png" in run.output, run
    assert "symbolic links" in run.output or "symlink loop" in run.output, run


def _odd_images_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "odd"
    _png(folder / "a_good.png", 64, 48)
    _png(folder / "b_dot.png", 1, 1)
    _png(folder / "c_thin.png", 10000, 10)
    _png(folder / "d_good.png", 48, 64, seed=3)
    return folder


def test_tiny_and_thin_images_come_out_of_predict_with_the_others(tmp_path, weights):
    folder = _odd_images_folder(tmp_path)
    out = tmp_path / "pred"
    run = cli("predict", folder, "--weights", weights, "--out", out, "--json", tmp_path / "p.json",
              "--threshold", "0", "--no-progress", "--batch-size", "4")
    assert run.code == 0, run
    assert sorted(p.name for p in out.iterdir()) == ["a_good.png", "b_dot.png", "c_thin.png", "d_good.png"]
    assert Image.open(out / "c_thin.png").size == (10000, 10)


def test_thin_image_in_eval_train_viz_and_check(tmp_path, weights):
    ann = _coco(tmp_path / "thin", [(64, 64), (10000, 10), (1, 1), (64, 48)])
    run = cli("data", "check", ann)
    assert "aspect ratio" in run.output and "im2.png" in run.output, run
    run = cli("eval", "--weights", weights, "--data", ann, "--device", "cpu")
    assert run.code == 0 and "AP @[IoU=0.50:0.95" in run.output, run
    run = cli("viz", "queries", "--weights", weights, "--data", ann, "--out", tmp_path / "q.png",
              "--threshold", "0")
    assert run.code == 0 and (tmp_path / "q.png").exists(), run
    run = cli("viz", "attention", tmp_path / "thin" / "images" / "im2.png", "--weights", weights,
              "--out", tmp_path / "a.png", "--threshold", "0")
    assert run.code == 0 and (tmp_path / "a.png").exists(), run


def test_decompression_bomb_refused_from_its_header(tmp_path, weights):
    root = tmp_path / "bomb"
    ann = _coco(root, [(64, 64), (64, 64), (20000, 20000)], files={3: "bomb.png"})
    _png_bomb(root / "images" / "bomb.png", 20000, 20000)
    run = cli("data", "check", ann)
    assert run.code == 1 and "bomb.png" in run.output and "decompression bomb" in run.output, run
    assert "400 Mpx" in run.output, run
    run = cli("predict", root / "images", "--weights", weights, "--json", tmp_path / "p.json", "--no-progress")
    assert run.code == 0 and "decompression bomb" in run.output and "2 image(s)" in run.output, run


def test_training_survives_a_symlink_loop_a_bomb_and_thin_images(tmp_path):
    """One run over every odd image: the loop and the bomb are counted bad samples, the 10000x10 and
    1x1 images train (resized with a floor), the run ends with weights."""
    root = tmp_path / "odd"
    ann = _coco(root, [(64, 64), (10000, 10), (1, 1), (64, 48), (64, 64), (40000, 40000)],
                files={5: "loop.png", 6: "bomb.png"})
    (root / "images" / "loop.png").symlink_to(root / "images" / "loop.png")
    _png_bomb(root / "images" / "bomb.png", 40000, 40000)
    run = cli("train", "--data", ann, "--out", tmp_path / "run", "--config", _tiny_config(tmp_path, epochs=2),
              "--device", "cpu")
    assert run.code == 0 and "2 bad samples skipped" in run.output, run
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    bad = (tmp_path / "run" / "bad_samples.jsonl").read_text()
    assert "bomb.png" in bad and "decompression bomb" in bad and "loop.png" in bad and "symlink loop" in bad


# ------------------------------------------------------------------------------------- 3. weights
def test_own_state_dict_in_a_pth_is_recognised_or_refused_never_read_as_the_authors(tmp_path, coco_set, weights):
    from detrkit.weights.authors import to_authors_keys
    from detrkit.weights.native import load_native

    sd, cfg = load_native(weights)
    image = next((coco_set.parent / "images").iterdir())
    predict = ("predict", image, "--threshold", "0", "--no-progress", "--precision", "float32", "--json")
    bare = tmp_path / "mine.pth"
    torch.save({"model": sd}, bare)
    run = cli(*predict, tmp_path / "bare.json", "--weights", bare)
    assert run.code != 0 and "mine.pth" in run.output and "detrkit's own state dict" in run.output, run
    assert not (tmp_path / "bare.json").exists()
    # with its config beside it, it is recognised and predicts exactly what the native file does
    with_cfg = tmp_path / "mine_cfg.pth"
    torch.save({"model": sd, "model_cfg": cfg.to_dict()}, with_cfg)
    assert cli(*predict, tmp_path / "cfg.json", "--weights", with_cfg).code == 0
    assert cli(*predict, tmp_path / "native.json", "--weights", weights).code == 0
    assert json.loads((tmp_path / "cfg.json").read_text()) == json.loads((tmp_path / "native.json").read_text())
    # the authors' key names with a tensor of the wrong shape: refused, naming the tensor
    authors = to_authors_keys(sd)
    authors["transformer.decoder.norm.weight"] = torch.ones(7)
    bad = tmp_path / "detr-bad.pth"
    torch.save({"model": authors}, bad)
    run = cli(*predict, tmp_path / "bad.json", "--weights", bad)
    assert run.code != 0 and "detr-bad.pth" in run.output and "transformer.decoder.norm.weight" in run.output, run


# -------------------------------------------------------------------------------------- 4. configs
def test_config_errors_name_the_config_file(tmp_path, coco_set, weights):
    from detrkit.weights.native import load_native

    cases = {"unknown_key.yaml": ("model:\n  hidden_dimm: 64\n", "hidden_dimm"),
             "bad_value.yaml": ("train:\n  batch_size: two\n", "batch_size"),
             "shapes.yaml": ("model:\n  hidden_dim: 30\n  nheads: 8\n", "not divisible")}
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        run = cli("train", "--data", coco_set, "--out", tmp_path / "run", "--config", tmp_path / name,
                  "--device", "cpu")
        assert run.code != 0 and name in run.output and fragment in run.output, (name, run)
        assert not (tmp_path / "run" / "last.pt").exists()
    # the config.json of a weights folder: an unknown key, then a shape its tensors do not have
    sd, cfg = load_native(weights)
    folder = tmp_path / "weights_dir"
    save_native(sd, cfg, folder)
    meta = json.loads((folder / "config.json").read_text())
    image = next((coco_set.parent / "images").iterdir())
    for change, fragment in (({"hidden_dimm": 64}, "hidden_dimm"), ({"dim_feedforward": 128}, "wrong shape")):
        (folder / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], **change}}))
        run = cli("predict", image, "--weights", folder, "--json", tmp_path / "p.json", "--no-progress")
        assert run.code != 0 and "config.json" in run.output and fragment in run.output, (change, run)


# --------------------------------------------------------------------------- 5. runs and the flags
@pytest.mark.parametrize("argv, flag, fragment", [
    (("predict", "x.jpg", "--weights", "w", "--json", "o.json", "--threshold", "2"), "--threshold", "between 0 and 1"),
    (("predict", "x.jpg", "--weights", "w", "--json", "o.json", "--top-k", "-1"), "--top-k", "positive integer"),
    (("predict", "x.jpg", "--weights", "w", "--json", "o.json", "--batch-size", "0"), "--batch-size", "positive"),
    (("train", "--data", "d", "--out", "o", "--max-minutes", "-5"), "--max-minutes", "positive number"),
    (("train", "--data", "d", "--out", "o", "--max-minutes", "nan"), "--max-minutes", "finite"),
    (("train", "--data", "d", "--out", "o", "--batch-size", "0"), "--batch-size", "positive integer"),
    (("train", "--data", "d", "--out", "o", "--epochs", "0"), "--epochs", "positive integer"),
    (("train", "--data", "d", "--out", "o", "--max-steps", "-3"), "--max-steps", "positive integer"),
    (("eval", "--weights", "w", "--data", "d", "--batch-size", "0"), "--batch-size", "positive integer"),
    (("eval", "--weights", "w", "--data", "d", "--num-workers", "-1"), "--num-workers", "0 or more"),
    (("viz", "queries", "--weights", "w", "--data", "d", "--out", "q.png", "--min-score", "1.5"), "--min-score",
     "between 0 and 1"),
    (("viz", "attention", "x.jpg", "--weights", "w", "--out", "a.png", "--dpi", "0"), "--dpi", "positive"),
    (("data", "synth", "out", "--images", "0"), "--images", "positive integer"),
    (("viz", "masks", "x.jpg", "--weights", "w", "--out", "m.png", "--threshold", "7"), "--threshold",
     "between 0 and 1"),
])
def test_numeric_flags_are_validated_naming_the_flag(tmp_path, argv, flag, fragment):
    run = cli(*argv)
    assert run.code == 2 and f"argument {flag}" in run.output and fragment in run.output, run


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(tmp_path, coco_set):
    config = _tiny_config(tmp_path)  # 1 epoch of 4 images at batch 2: 2 steps
    run_dir = tmp_path / "run"
    assert cli("train", "--data", coco_set, "--out", run_dir, "--config", config, "--device", "cpu").code == 0
    before = {p.name: p.read_bytes() for p in (run_dir / "last.pt", run_dir / "metrics.jsonl")}
    run = cli("train", "--data", coco_set, "--out", run_dir, "--config", config, "--device", "cpu", "--resume",
              "--max-steps", "40")
    assert run.code == 0 and "nothing to do" in run.output and "2 steps" in run.output, run
    assert {p: (run_dir / p).read_bytes() for p in before} == before  # nothing rewritten


def test_a_second_live_run_into_the_same_folder_is_refused_a_stale_lock_taken_over(tmp_path, coco_set):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run_dir / "train.lock").write_text(json.dumps({"pid": owner.pid, "host": os.uname().nodename,
                                                        "started": "earlier"}))
        run = cli("train", "--data", coco_set, "--out", run_dir, "--config", _tiny_config(tmp_path),
                  "--device", "cpu")
        assert run.code != 0 and f"in use by another training run (pid {owner.pid}" in run.output, run
        assert not (run_dir / "last.pt").exists() and json.loads((run_dir / "train.lock").read_text())["pid"] == owner.pid
    finally:
        owner.kill()
        owner.wait()
    run = cli("train", "--data", coco_set, "--out", run_dir, "--config", _tiny_config(tmp_path), "--device", "cpu")
    assert run.code == 0 and "stale lock" in run.output and (run_dir / "last.pt").exists(), run
    assert not (run_dir / "train.lock").exists()  # released at the end


def _disk_fills_after(monkeypatch, good_writes: int) -> None:
    """The atomic writer succeeds `good_writes` times, then the disk is full half way through a file."""
    import errno

    from detrkit import atomic

    real, calls = atomic._write, []

    def write(path, payload):
        calls.append(path)
        if len(calls) <= good_writes:
            return real(path, payload)
        with open(path, "wb") as f:
            f.write(payload[: len(payload) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_write", write)


def test_full_disk_one_line_naming_the_path_keeps_the_previous_checkpoint_no_temp_files(tmp_path, monkeypatch,
                                                                                         coco_set):
    from detrkit.engine.checkpoint import DiskFullError, load_checkpoint, save_run_checkpoint

    save_run_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path)
    _disk_fills_after(monkeypatch, 0)
    with pytest.raises(DiskFullError) as e:
        save_run_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path)
    assert str(e.value).startswith(str(tmp_path / "last.pt")) and "disk full" in str(e.value)
    assert "\n" not in str(e.value) and e.value.errno == 28
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    # through a training run: the first checkpoint is written, the disk fills on the second
    monkeypatch.undo()
    _disk_fills_after(monkeypatch, 1)
    run_dir = tmp_path / "run"
    run = cli("train", "--data", coco_set, "--out", run_dir, "--config",
              _tiny_config(tmp_path, checkpoint_every_steps=1), "--device", "cpu")
    assert run.code != 0 and f"{run_dir / 'last.pt'}: disk full" in run.output, run
    assert load_checkpoint(run_dir / "last.pt")["step"] == 1
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_eval_of_a_model_with_categories_the_data_lacks_scores_the_overlap(tmp_path, weights):
    ann = _coco(tmp_path / "two", [(64, 64), (64, 48)])  # ids 1, 2; the model knows 1..5
    run = cli("eval", "--weights", weights, "--data", ann, "--device", "cpu", "--out", tmp_path / "m.json")
    assert run.code == 0 and "[3, 4, 5] are not in the ground truth" in run.output, run
    assert "shared categories [1, 2]" in run.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0
