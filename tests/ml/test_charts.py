"""The one charting module: charts are well-formed SVG with their text escaped, the same bytes for the same
data, and the benchmark's figure is one of them, written as a file of its own."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from ml.benchmark import plot_paper
from ml.charts import Bar, Rule, Series, bar_chart, line_chart

SVG = "{http://www.w3.org/2000/svg}"


def section(kd: float, fm: float) -> dict:
    attacks = {"kd": {"margin": kd, "margin_se": 0.5}, "fm<b>": {"margin": fm, "margin_se": 1.0}}
    return {"students": {"mlp": {"attacks": attacks}}}


def budget_curve() -> str:
    series = [Series("a & <b>", [10, 100, 1000], [1.0, -2.0, 3.0])]
    rules = [Rule(0.0, "LS"), Rule(100.0, "safe <budget>", axis="x")]
    return line_chart(series, "budget <curve>", "queries", "margin", log_x=True, rules=rules)


def test_charts_are_well_formed_with_their_text_escaped() -> None:
    line = budget_curve()
    bars = bar_chart(
        [Bar("<script>x</script>", 80.0, 1.0, True), Bar("kd", 70.0, 0.5)], "t", "acc", reference=75
    )
    for svg in (line, bars):
        root = ET.fromstring(svg)  # well-formed: nothing a name carries becomes markup
        assert root.tag == f"{SVG}svg" and "<script" not in svg
    texts = [t.text for t in ET.fromstring(line).iter(f"{SVG}text")]
    assert "a & <b>" in texts and "safe <budget>" in texts
    assert len(ET.fromstring(bars).findall(f"{SVG}rect")) == 2
    assert line == budget_curve()  # the same bytes for the same data


def test_the_benchmarks_figure_is_an_svg_file_with_a_bar_per_protection_and_attack(tmp_path: Path) -> None:
    report = {
        **section(-1.0, -2.0),
        "control": section(3.0, 4.0),
        "protections": {"nasty": section(0.5, -0.5)},
        "dataset": {"name": "mnist1d"},
        "config": {"seeds": 2},
    }
    path = tmp_path / "paper.svg"
    plot_paper(report, "mlp", str(path))
    root = ET.parse(path).getroot()
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert root.tag == f"{SVG}svg" and "mnist1d, mlp student, 2 seeds" in labels
    for protection in ("ce", "cmim", "nasty"):
        assert {f"{protection} · kd", f"{protection} · fm<b>"} <= set(labels)
    assert len(root.findall(f"{SVG}rect")) == 6
    first = path.read_bytes()
    plot_paper(report, "mlp", str(path))
    assert path.read_bytes() == first
