"""Run folders that never lose work (issue 15, problems 1 and 10)."""
import json

from detrkit.engine.run_folder import claim_run_dir, holds_run, trim_metrics


def test_new_run_never_enters_a_folder_with_a_run(tmp_path):
    out = tmp_path / "runs" / "x"
    assert claim_run_dir(out) == out  # created
    assert claim_run_dir(out) == out  # still empty: used as it is
    (out / "metrics.jsonl").write_text("{}\n")
    assert holds_run(out)
    second = claim_run_dir(out)
    assert second == tmp_path / "runs" / "x-2" and second.is_dir()
    (second / "config.json").write_text("{}")
    assert claim_run_dir(out) == tmp_path / "runs" / "x-3"
    (tmp_path / "runs" / "x-3" / "last.pt").write_text("")
    assert claim_run_dir(tmp_path / "runs" / "x-3") == tmp_path / "runs" / "x-4"  # not x-3-2
    assert claim_run_dir(out, resume=True) == out


def test_trim_metrics_keeps_one_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"type": "pretrain", "steps": 5}] + [{"type": "train", "step": s} for s in (10, 20, 30)] + \
           [{"type": "eval", "step": 20, "AP": 0.1}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"type": "train", "st')
    assert trim_metrics(path, 20) == 2
    left = [json.loads(line) for line in path.read_text().splitlines()]
    assert left == recs[:3] + recs[4:]
