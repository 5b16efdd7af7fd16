"""The results report: markdown numbers, text table, plots, write_report."""
import copy
import json

import pytest

from w2s_jax import report


def _run(name, role, model, accuracy, supervisor=None, method="xent", stopping="none", **extra):
    return {"name": name, "role": role, "model": model, "supervisor": supervisor, "method": method,
            "accuracy": accuracy, "early_stopping": stopping, **extra}


RESULTS = {
    "task": "chess",
    "models": {"tiny": {"params": 1_000_000}, "small": {"params": 10_000_000}, "base": {"params": 124_000_000}},
    "runs": [
        _run("gt_base", "ceiling", "base", 0.8),
        _run("gt_tiny", "weak", "tiny", 0.6),
        _run("gt_small", "weak", "small", 0.7),
        _run("tiny_base_xent", "student", "base", 0.7, "tiny", pgr=0.5, agreement=0.9, error_agreement=0.75),
        _run("tiny_base_logconf", "student", "base", 0.75, "tiny", "logconf", pgr=0.75, agreement=0.8,
             error_agreement=0.4),
        _run("small_base_xent", "student", "base", 0.78, "small", pgr=0.8, agreement=0.85, error_agreement=0.6),
        _run("tiny_small_xent", "student", "small", 0.58, "tiny", pgr=None, agreement=0.95, error_agreement=None),
        _run("tiny_base_oracle", "student", "base", 0.72, "tiny", stopping="ground_truth_oracle", pgr=0.6,
             agreement=0.88, error_agreement=0.7),
    ],
    "notes": ["tiny models pretrained from scratch"],
}


def test_markdown_ground_truth_rows_in_size_order():
    md = report.results_markdown(RESULTS)
    rows = [
        "| tiny | 1M | weak | xent | none | 0.600 |",
        "| small | 10M | weak | xent | none | 0.700 |",
        "| base | 124M | ceiling | xent | none | 0.800 |",
    ]
    positions = [md.index(row) for row in rows]
    assert positions == sorted(positions)
    assert md.startswith("# Weak-to-strong results: chess\n")


def test_markdown_student_rows():
    md = report.results_markdown(RESULTS)
    assert ("| supervisor | student | method | early stopping | accuracy [95% CI] | PGR [95% CI] | "
            "agreement [95% CI] | error agreement | ceiling agreement | per seed |") in md
    assert "| tiny | base | xent | none | 0.700 | 0.500 | 0.900 | 0.750 | – | – |" in md
    assert "| tiny | base | logconf | none | 0.750 | 0.750 | 0.800 | 0.400 | – | – |" in md
    assert "| small | base | xent | none | 0.780 | 0.800 | 0.850 | 0.600 | – | – |" in md
    assert "| tiny | small | xent | none | 0.580 | n/a† | 0.950 | – | – | – |" in md
    assert "| tiny | base | xent | GT oracle‡ | 0.720 | 0.600 | 0.880 | 0.700 | – | – |" in md
    assert report.FOOTNOTE_PGR in md and report.FOOTNOTE_ORACLE in md
    assert "- tiny models pretrained from scratch" in md


def test_markdown_median_pgr_per_method():
    md = report.results_markdown(RESULTS)
    assert "| xent | none | 2/3 | 0.650 |" in md  # median of 0.5 and 0.8; the undefined pair is skipped
    assert "| logconf | none | 1/1 | 0.750 |" in md
    assert "| xent | GT oracle‡ | 1/1 | 0.600 |" in md  # oracle runs never mix with realistic ones
    assert md.index("| xent | none | 2/3") < md.index("| xent | GT oracle‡ | 1/1")


def test_no_footnotes_when_not_needed():
    results = copy.deepcopy(RESULTS)
    results["runs"] = [r for r in results["runs"] if r["name"] in ("gt_tiny", "gt_base", "tiny_base_xent")]
    md = report.results_markdown(results)
    assert "†" not in md and "‡" not in md and report.NOTE_AGREEMENT in md
    assert "| xent | none | 1/1 | 0.500 |" in md


def test_text_table_has_the_numbers(capsys):
    report.print_table(RESULTS)
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["small", "10M", "weak", "xent", "none", "0.700", "–"] in lines
    assert ["small", "base", "xent", "none", "0.780", "0.800", "0.850", "0.600", "–", "–"] in lines
    assert "n/a†" in out


def test_format_params():
    assert report.format_params(124_000_000) == "124M"
    assert report.format_params(6_738_415_616) == "6.74B"
    assert report.format_params(1_500) == "1.5K"
    assert report.format_params(999) == "999"


def test_bad_results_name_the_problem():
    results = copy.deepcopy(RESULTS)
    results["runs"][3]["model"] = "huge"
    with pytest.raises(ValueError, match=r"runs'\]\[3\] \('tiny_base_xent'\): model 'huge' is not in"):
        report.results_markdown(results)
    results = copy.deepcopy(RESULTS)
    del results["runs"][0]["accuracy"]
    with pytest.raises(ValueError, match="'gt_base'.*lacks the key 'accuracy'"):
        report.results_markdown(results)
    results = copy.deepcopy(RESULTS)
    results["runs"][3]["early_stopping"] = "oracle"
    with pytest.raises(ValueError, match="early_stopping 'oracle' is not one of"):
        report.results_markdown(results)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_make_plots_writes_pngs(tmp_path):
    paths = report.make_plots(RESULTS, tmp_path / "plots")
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["accuracy_vs_size.png", "pgr_by_method.png"]
    assert all(_is_png(p) for p in paths)


def test_make_plots_single_pair_and_missing_params(tmp_path):
    results = {
        "task": "sciq",
        "models": {"weak": {"params": None}, "strong": {}},
        "runs": [
            _run("w", "weak", "weak", 0.6),
            _run("s", "ceiling", "strong", 0.7),
            _run("w2s", "student", "strong", 0.6, "weak", pgr=0.0, agreement=1.0, error_agreement=1.0),
        ],
    }
    paths = report.make_plots(results, tmp_path)
    assert len(paths) == 2 and all(_is_png(p) for p in paths)


def test_make_plots_without_students(tmp_path):
    results = {"task": "t", "models": {"m": {"params": 10}}, "runs": [_run("m", "ceiling", "m", 0.9)]}
    paths = report.make_plots(results, tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["accuracy_vs_size.png"]


def test_write_report(tmp_path):
    paths = report.write_report(RESULTS, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == RESULTS
    assert (tmp_path / "results.md").read_text() == report.results_markdown(RESULTS)
    assert all(_is_png(tmp_path / "plots" / name) for name in ("accuracy_vs_size.png", "pgr_by_method.png"))
    assert len(paths) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "results.json", "results.md"]


def test_intervals_seeds_and_provenance_are_printed():
    results = copy.deepcopy(RESULTS)
    results.update(command="python launch/main.py --config=configs/chess.py", commit="abc1234", seeds=[0, 1, 2],
                   n_test=500, test_clusters=480, interval="95% two-level bootstrap")
    base = results["runs"][0]
    base.update(accuracy_ci=[0.75, 0.85], accuracy_seeds=[0.79, 0.8, 0.81])
    student = results["runs"][3]
    student.update(accuracy_ci=[0.65, 0.74], pgr_ci=[0.2, 0.8], agreement_ci=[0.85, 0.94])
    undefined = results["runs"][6]
    undefined["pgr_undefined"] = "gap within noise"
    md = report.results_markdown(results)
    assert "command: `python launch/main.py --config=configs/chess.py`  \ncommit: abc1234  \nseeds: 0, 1, 2" in md
    assert "| base | 124M | ceiling | xent | none | 0.800 [0.750, 0.850] | 0.79 / 0.80 / 0.81 |" in md
    assert "| tiny | base | xent | none | 0.700 [0.650, 0.740] | 0.500 [0.200, 0.800] | 0.900 [0.850, 0.940] |" in md
    assert "| tiny | small | xent | none | 0.580 | n/a† (gap in noise) |" in md


def test_the_gap_under_each_pgr_is_listed_once_per_pair():
    results = copy.deepcopy(RESULTS)
    for name, gap, ci in [("tiny_base_xent", 0.2, [0.15, 0.26]), ("tiny_base_logconf", 0.2, [0.15, 0.26]),
                          ("small_base_xent", 0.1, [0.04, 0.17])]:
        run = next(r for r in results["runs"] if r["name"] == name)
        run.update(weak_run="gt_" + name.split("_")[0], ceiling_run="gt_base", gap=gap, gap_ci=ci)
    md = report.results_markdown(results)
    section = md.split("## Capability gaps\n\n")[1].split("\n\n")[0]
    assert section.splitlines()[2:] == ["| tiny | base | 0.200 [0.150, 0.260] |",
                                        "| small | base | 0.100 [0.040, 0.170] |"]
    assert "Capability gaps" not in report.results_markdown(RESULTS)  # no gap recorded, no section


def test_chains_count_by_their_final_step_in_the_median():
    results = copy.deepcopy(RESULTS)
    results["runs"] += [
        _run("chain1", "student", "small", 0.65, "tiny", "chain:tiny->small->base step 1", pgr=0.1,
             chain_final=False, chain_step=1),
        _run("chain2", "student", "base", 0.7, "tiny", "chain:tiny->small->base", pgr=0.5, chain_final=True,
             chain_step=2)]
    md = report.results_markdown(results)
    assert "| chain:tiny->small->base | none | 1/1 | 0.500 |" in md
    assert "step 1 | none | 1/1" not in md


def test_pgr_plot_says_why_it_is_empty(tmp_path):
    results = copy.deepcopy(RESULTS)
    for r in results["runs"]:
        if r["role"] == "student":
            r["pgr"], r["pgr_undefined"] = None, "gap within noise"
    fig = report._pgr_figure(results)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("no PGR is defined" in t and "gap within noise" in t for t in texts)
