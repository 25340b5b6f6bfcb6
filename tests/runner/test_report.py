import csv
import json

from runner.report import main


def fake_run(folder, overrides, status, metrics, baseline=None, config=None):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "results.json").write_text(json.dumps({"status": status, "metrics": metrics, "config": config or {},
                                                     "baseline_metrics": baseline or {}, "error": None}))


def test_report_over_a_sweep_with_a_failed_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    base = {"toy_arith/exact_match": 0.10, "toy_ppl/bits_per_byte": 5.0}
    fake_run(sweep / "0-fkl", ["recipe=fkl_distill", "output_root=/x"], "completed",
             {"toy_arith/exact_match": 0.40, "toy_ppl/bits_per_byte": 6.0, "toy_arith/acc_norm": 0.3}, base)
    fake_run(sweep / "1-akl", ["recipe=akl_distill"], "failed", {})
    fake_run(sweep / "10-tvd", ["recipe=tvd_distill"], "completed", {"toy_arith/exact_match": 0.55}, base)
    fake_run(sweep / "2-jsd", ["recipe=jsd_distill"], "completed", {"toy_arith/exact_match": 0.25}, base)
    assert main([str(sweep)]) == 0
    with (sweep / "report.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["run", "overrides", "status", "toy_arith/exact_match", "toy_ppl/bits_per_byte",
                        "Δ toy_arith/exact_match", "Δ toy_ppl/bits_per_byte"]
    assert [row[0] for row in table[1:]] == ["0-fkl", "1-akl", "2-jsd", "10-tvd"]  # numeric job order
    assert table[1] == ["0-fkl", "recipe=fkl_distill", "completed", "0.400", "6.000", "+0.300", "+1.000"]
    assert table[2] == ["1-akl", "recipe=akl_distill", "failed", "", "", "", ""]  # failed runs stay visible
    assert table[4][5] == "+0.450"
    assert (sweep / "report.md").read_text().startswith("| run | overrides | status |")
    assert "4 run(s)" in capsys.readouterr().out


def test_metric_patterns_and_errors(tmp_path, capsys):
    fake_run(tmp_path / "run", [], "completed", {"a/acc": 0.5, "a/acc_norm": 0.6, "b/exact_match": 1.0})
    assert main([str(tmp_path), "--metrics", "*/acc_norm"]) == 0
    with (tmp_path / "report.csv").open() as f:
        assert next(csv.reader(f)) == ["run", "overrides", "status", "a/acc_norm"]
    assert main([str(tmp_path / "nope")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_series_groups_by_the_other_overrides_and_sorts_by_x(tmp_path):
    from runner.report import collect, series

    for i, (lam, layers, acc) in enumerate([(0.8, None, 0.9), (0.2, None, 0.1), (0.5, "1", 0.4), (0.2, "1", 0.2)]):
        overrides = [f"merge.lam={lam}"] + ([f"merge.layers={layers}"] if layers else [])
        fake_run(tmp_path / f"{i}-mi", overrides, "completed", {"t/exact_match": acc},
                 config={"merge": {"lam": lam, "layers": layers}})
    fake_run(tmp_path / "4-mi", ["merge.lam=0.6"], "failed", {}, config={"merge": {"lam": 0.6}})
    groups = series(collect([tmp_path]), "merge.lam")
    assert groups == {"runs": [(0.2, {"t/exact_match": 0.1}), (0.8, {"t/exact_match": 0.9})],
                      "merge.layers=1": [(0.2, {"t/exact_match": 0.2}), (0.5, {"t/exact_match": 0.4})]}


def test_plot_against_a_config_key(tmp_path, capsys):
    for i, lam in enumerate([0.0, 0.5, 1.0]):
        fake_run(tmp_path / f"{i}-mi", [f"merge.lam={lam}"], "completed",
                 {"t/exact_match": lam / 2, "t/think_rate": lam}, config={"merge": {"lam": lam}, "name": "mi"})
    assert main([str(tmp_path), "--x", "merge.lam"]) == 0
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path), "--x", "name"]) == 2  # not numeric
    assert main([str(tmp_path), "--x", "merge.nope"]) == 2
    assert "no completed run has a numeric value" in capsys.readouterr().err


def test_series_against_a_metric_one_line_per_config_value(tmp_path):
    from runner.report import collect, series

    for i, (method, bits, eff, acc) in enumerate([("rtn", 4, 4.6, 0.9), ("rtn", 2, 2.6, 0.4), ("gptq", 2, 2.6, 0.8),
                                                   ("ptqtp", 4, 4.2, 0.7)]):
        fake_run(tmp_path / f"{i}-q", [f"quant.method={method}", f"quant.bits={bits}"], "completed",
                 {"quant/effective_bits": eff, "t/exact_match": acc}, config={"quant": {"method": method, "bits": bits}})
    groups = series(collect([tmp_path]), "quant/effective_bits", by="quant.method")
    assert {label: [(x, m["t/exact_match"]) for x, m in points] for label, points in groups.items()} == {
        "quant.method=rtn": [(2.6, 0.4), (4.6, 0.9)], "quant.method=gptq": [(2.6, 0.8)], "quant.method=ptqtp": [(4.2, 0.7)]}
    assert main([str(tmp_path), "--x", "quant/effective_bits", "--by", "quant.method"]) == 0
    assert (tmp_path / "report.png").is_file()
