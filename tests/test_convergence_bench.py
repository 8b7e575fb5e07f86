"""The convergence runner's summary: what each switch bought against the base of the same command."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("convergence_runner", ROOT / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(variant, ap, ap50, steps, curve, grid="g1", dataset="main"):
    return {"dataset": dataset, "variant": variant, "grid": grid, "AP": ap, "AP50": ap50, "steps": steps,
            "curve": curve}


def test_each_switch_is_compared_with_its_own_base_at_the_end_and_mid_run(runner):
    rows = [
        _row("base", 0.20, 0.40, 5000, [[1000, 0.30], [2000, 0.35], [3000, 0.38], [4000, 0.40], [5000, 0.40]]),
        _row("dn", 0.25, 0.50, 4100, [[1000, 0.33], [2000, 0.45], [3000, 0.48], [4000, 0.49], [4100, 0.50]]),
        _row("base", 0.90, 0.90, 10, [[10, 0.9]], grid="g2"),  # another command's base: not compared
        _row("enc", 0.10, 0.20, 500, [[500, 0.2]], grid="g3"),  # no base in its command: left out
    ]
    lines = runner.bought(rows).splitlines()
    assert len(lines) == 3  # header, rule, the one comparable row
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:6] == ["main", "g1", "dn", "0.250 (0.200)", "0.500 (0.400)", "4100 (5000)"]
    # the shared evaluation nearest the middle of the shorter run (4100 / 2), not the last shared one
    assert cells[6:] == ["2000", "0.450 (0.350)"]


def test_rows_without_a_grid_give_no_summary(runner):
    rows = [{k: v for k, v in _row("base", 0.2, 0.4, 10, []).items() if k != "grid"}]
    assert runner.bought(rows) == ""


def test_every_variant_trains_its_switches_as_named(runner):
    from detrkit.engine.input_fit import fit_to_data
    from test_input_fit import _index

    crowded = _index([28, 3])  # more objects than detr-tiny's 20 queries: the fit grows the queries only
    for variant in ("preset", "base", "dn", "cdn", "guide", "all"):
        model, train = runner.variant_configs("detr-tiny", variant, {"eos_coef": 0.2})
        assert train.eos_coef == 0.2  # --set applies on top of the variant
        _, ran, _ = fit_to_data(crowded, model.with_classes(["cell"], [1]), train)
        assert {k: getattr(ran, k) for k in runner._OFF} == {k: getattr(train, k) for k in runner._OFF}, variant
        if variant != "preset":
            assert {k: getattr(ran, k) for k in runner._OFF} == {**runner._OFF, **runner.VARIANTS[variant]}, variant
