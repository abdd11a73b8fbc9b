"""`fastattr report` on synthetic run and compare dirs: produced, self-contained, and every section present."""
import json
import re

import pytest

from _synthetic_run import add_application_outputs, make_run
from fastattr import report


def _section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def test_report_of_a_run_has_every_section_filled(tmp_path):
    run = make_run(tmp_path / "run", rounds=range(4), n=256)
    add_application_outputs(run)
    assert report.main([str(run)]) == 0
    page = (run / "report.html").read_text()
    for sid, _ in report.SECTIONS:
        assert 'class="missing"' not in _section(page, sid), sid
    assert page.count("data:image/png;base64,") >= 6   # curves, scores, cost, diagnosis x2, intervention
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)   # self-contained: nothing loaded from outside
    assert (run / "diagnose_round_3.json").exists()                # auto-diagnosed the last round (< 6 saved)
    assert "test-probe" in _section(page, "behaviour") and "drop negative" in _section(page, "intervention")


def test_report_without_application_outputs_says_how_to_get_them(tmp_path):
    run = make_run(tmp_path / "run", rounds=(0,), n=128)
    assert report.main([str(run), "--no-auto-diagnose", "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    for sid, how in (("diagnosis", "fastattr diagnose"), ("behaviour", "fastattr behaviour"),
                     ("intervention", "fastattr intervene"), ("validation", "fastattr validate")):
        assert how in _section(page, sid)
    assert 'class="missing"' not in _section(page, "curves")


def test_report_of_a_compare_dir_groups_methods_over_seeds(tmp_path):
    for method in ("ppo", "iif"):
        for seed in (0, 1):
            r = make_run(tmp_path / method / f"seed_{seed}", rounds=range(3), n=128, seed=seed)
            args = json.loads((r / "args.json").read_text())
            (r / "args.json").write_text(json.dumps({**args, "method": method, "p": 0.5}))
    # iif seed 1 has no evaluation at round 1: the seeds are averaged at the x values both have, not by position
    lines = [json.loads(x) for x in (tmp_path / "iif" / "seed_1" / "metrics.jsonl").read_text().splitlines()]
    lines[1]["eval/return_mean"] = None
    (tmp_path / "iif" / "seed_1" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    runs = report.find_runs(tmp_path)
    assert len(runs) == 4 and {report.method_of(r) for r in runs} == {"ppo", "iif (p=0.5)"}
    _, table = report.curves_figure(runs)
    assert {row["method"]: row["seeds"] for row in table} == {"ppo": 2, "iif (p=0.5)": 2}
    iif = next(row for row in table if row["method"] == "iif (p=0.5)")
    assert iif["x_final"] == 3 * 128 and iif["final"]["mean"] == pytest.approx(0.2)
    assert report.main([str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "iif (p=0.5)" in page and "<b>2</b><span>rounds (max)</span>" in page  # the largest round, not lines


def test_random_control_is_labelled_with_its_p(tmp_path):
    """random drops as many records as iif at p, so runs at different p are different methods."""
    for p in (0.5, 0.125):
        r = make_run(tmp_path / f"random_{p}" / "seed_0", rounds=range(2), n=64)
        args = json.loads((r / "args.json").read_text())
        (r / "args.json").write_text(json.dumps({**args, "method": "random", "p": p}))
    assert {report.method_of(r) for r in report.find_runs(tmp_path)} == {"random (p=0.5)", "random (p=0.125)"}


def test_report_bad_input(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "holds no fastattr run" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        report.find_runs(tmp_path / "absent")
