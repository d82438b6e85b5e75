"""tools/readme_tables.py: the README's measured tables are the records' numbers. A table that
no longer matches its records (measured again, or edited by hand) fails `make test`."""

import json
import shutil

import pytest
from benchmark_scripts import load

from moe_course import RESULTS_DIR, ROOT

tables = load("readme_tables", folder="tools")


def test_the_readme_tables_match_the_records(capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


@pytest.fixture
def readme(tmp_path):
    copy = tmp_path / "README.md"
    copy.write_text((ROOT / "README.md").read_text())
    return copy


def block(text: str, name: str) -> str:
    return next(m["body"] for m in tables.MARKER.finditer(text) if m["name"] == name)


def test_a_number_typed_by_hand_is_stale(readme, capsys):
    text = readme.read_text()
    ch02 = block(text, "ch02")
    readme.write_text(text.replace(ch02, ch02.replace("| torch._grouped_mm | 6", "| torch._grouped_mm | 7", 1)))
    assert tables.main(["--check", "--readme", str(readme)]) == 1
    assert "stale tables: ch02" in capsys.readouterr().err
    assert tables.main(["--readme", str(readme)]) == 0  # rewriting restores it
    assert readme.read_text() == (ROOT / "README.md").read_text()


def test_a_record_measured_again_changes_its_table(readme, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results)
    path = results / "ceilings__nvidia-h200.json"
    rec = json.loads(path.read_text())
    rec["data"]["matmul_tflops"] = 701.4
    path.write_text(json.dumps(rec))
    assert tables.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    assert "ch00" in capsys.readouterr().err
    assert tables.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert "| 701 TFLOP/s | 71% of the datasheet's 989 |" in block(readme.read_text(), "ch00")
    assert tables.main(["--check", "--readme", str(readme), "--results", str(results)]) == 0


def test_missing_markers_and_records_are_named(readme, tmp_path, capsys):
    text = readme.read_text()
    readme.write_text(text.replace("<!-- /table: ch04 -->\n", ""))
    assert tables.main(["--check", "--readme", str(readme)]) == 1
    assert "no markers for ch04" in capsys.readouterr().err
    readme.write_text(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tables.main(["--check", "--readme", str(readme), "--results", str(empty)]) == 1
    assert "no record ceilings__nvidia-h200.json" in capsys.readouterr().err


def test_chapter_10_adds_the_h100s_sonicmoe_table_only_where_it_measured_sonicmoe(tmp_path):
    """The H200's hf_backends record has no SonicMoE: the H100's (which has) follows it; without
    that record, or with SonicMoE gone from it, the block is the H200's table alone."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results)
    both = tables.ch10(tables.Records(results))
    assert "With SonicMoE beside them, on an H100" in both and "moe_course over sonicmoe" in both
    h100 = results / f"hf_backends__{tables.H100}.json"
    rec = json.loads(h100.read_text())
    for v in rec["data"]["experts"].values():
        v["backends"].pop("sonicmoe", None)
    h100.write_text(json.dumps(rec))
    alone = tables.ch10(tables.Records(results))
    h100.unlink()
    assert alone == tables.ch10(tables.Records(results)) and "on an H100" not in alone
    assert alone.endswith("Records: `hf_backends` (one per GPU).\n")
    # a model built with a narrower vocabulary (DeepSeek-V3 on an 80 GB card) is said so under its table
    h200 = results / "hf_backends__nvidia-h200.json"
    rec = json.loads(h200.read_text())
    rec["data"]["narrowed"] = {"deepseek_v3": {"vocab": 8192, "note": "vocabulary narrowed"}}
    h200.write_text(json.dumps(rec))
    assert "deepseek_v3's vocabulary narrowed to 8192 tokens to fit that card" in tables.ch10(tables.Records(results))
