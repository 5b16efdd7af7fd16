"""The results report: a markdown table to paste into a paper, a terminal table, and plots.

Input is the results dict the pipeline writes as results.json:

    {"task": str,
     "models": {name: {"params": int, ...}},
     "runs": [{"name", "role": "weak"|"ceiling"|"student"|"baseline", "model", "supervisor": None (ground truth)
               or a name, "method", "accuracy", "pgr", "agreement", "error_agreement",
               "early_stopping": "none"|"ground_truth"|"weak_labels"|"ground_truth_oracle", ...}],
     "notes": [str, ...]}

Numbers are means over the experiment's seeds; `<key>_ci` holds a 95% interval and `<key>_seeds` every seed's
value (pipeline.summarize, stats.py); `pgr_undefined` says why a PGR is not given. `commit`, `command` and
`seeds`, when present, head results.md, so a table pasted from it carries its provenance.

Runs with no supervisor were trained on ground truth (weak floors, ceilings); the others are students. A student's
`supervisor` names a run or a model; the supervisor's accuracy is that run's (or that model's ground-truth run's).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from w2s_jax.metrics import atomic_write_text, median_pgr, to_json

ROLES = ("weak", "ceiling", "student", "baseline")
EARLY_STOPPING = {"none": "none", "ground_truth": "ground truth", "weak_labels": "weak labels",
                  "ground_truth_oracle": "GT oracle‡"}
DECIMALS = 3
PGR_UNDEFINED = "n/a†"
UNDEFINED_REASONS = {"ceiling not above weak": "n/a† (ceiling ≤ weak)", "gap within noise": "n/a† (gap in noise)"}
MISSING = "–"
FOOTNOTE_PGR = ("† PGR undefined: the ceiling is not more accurate than the weak supervisor, or the 95% interval "
                "of the gap (ceiling - weak) reaches 0, so the ratio's interval is unbounded.")
NOTE_AGREEMENT = ("agreement: how often the student gives its supervisor's answer on the test set; error agreement: "
                  "the same on the supervisor's mistakes; ceiling agreement: how often the ceiling (the student "
                  "model trained on ground truth) gives the supervisor's answer: a student far above it imitates.")
FOOTNOTE_ORACLE = (
    "‡ Early stopping on the ground-truth labels of the student's validation examples: an oracle the "
    "weak-to-strong setting does not have (as in the paper), shown only for comparison."
)


# ----------------------------------------------------------------------------------------------------------------
# Reading the results dict
# ----------------------------------------------------------------------------------------------------------------


def check_results(results: dict[str, Any]) -> None:
    """Raise ValueError naming the first problem in a results dict."""
    for key in ("task", "models", "runs"):
        if key not in results:
            raise ValueError(f"results lack the key {key!r}")
    for i, run in enumerate(results["runs"]):
        where = f"results['runs'][{i}] ({run.get('name', '?')!r})"
        for key in ("name", "role", "model", "accuracy"):
            if key not in run:
                raise ValueError(f"{where} lacks the key {key!r}")
        if run["role"] not in ROLES:
            raise ValueError(f"{where}: role {run['role']!r} is not one of {', '.join(ROLES)}")
        if run["model"] not in results["models"]:
            raise ValueError(f"{where}: model {run['model']!r} is not in results['models']")
        if run.get("early_stopping", "none") not in EARLY_STOPPING:
            raise ValueError(
                f"{where}: early_stopping {run['early_stopping']!r} is not one of {', '.join(EARLY_STOPPING)}"
            )
        if run["role"] == "student" and run.get("supervisor") is None:
            raise ValueError(f"{where}: a student needs a supervisor")


def ground_truth_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs trained on ground truth, smallest model first."""
    runs = [r for r in results["runs"] if r.get("supervisor") is None]
    return sorted(runs, key=lambda r: (_params(results, r["model"]), r["model"], r["name"]))


def student_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs trained on a supervisor's labels, ordered by supervisor size, student size, method."""
    runs = [r for r in results["runs"] if r.get("supervisor") is not None]
    return sorted(
        runs,
        key=lambda r: (
            _params(results, supervisor_model(results, r["supervisor"])),
            _params(results, r["model"]),
            str(r["supervisor"]),
            r["model"],
            str(r.get("method")),
            _stopping_rank(r),
        ),
    )


def _params(results: dict[str, Any], model: str | None) -> float:
    params = results["models"].get(model, {}).get("params") if model is not None else None
    return float(params) if params is not None else float("inf")


def supervisor_run(results: dict[str, Any], supervisor: str) -> dict[str, Any] | None:
    """The run a supervisor name refers to: the run of that name, else that model's ground-truth run."""
    for run in results["runs"]:
        if run["name"] == supervisor:
            return run
    candidates = [r for r in ground_truth_runs(results) if r["model"] == supervisor]
    candidates.sort(key=lambda r: (r["role"] != "weak", r.get("early_stopping", "none") != "none"))
    return candidates[0] if candidates else None


def supervisor_model(results: dict[str, Any], supervisor: str) -> str | None:
    run = supervisor_run(results, supervisor)
    if run is not None:
        return run["model"]
    return supervisor if supervisor in results["models"] else None


# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------


def format_number(value: float | None, decimals: int = DECIMALS) -> str:
    return MISSING if value is None else f"{value:.{decimals}f}"


def format_params(params: int | None) -> str:
    """124000000 -> '124M'."""
    if params is None:
        return MISSING
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return str(int(params))


def _stopping_rank(run: dict[str, Any]) -> int:
    """Realistic early stopping first, the oracle last."""
    return list(EARLY_STOPPING).index(run.get("early_stopping", "none"))


def _early_stopping(run: dict[str, Any]) -> str:
    return EARLY_STOPPING[run.get("early_stopping", "none")]


def _method_label(run: dict[str, Any]) -> str:
    """Method name, with the early stopping when it is not 'none' (so oracle runs never pass as realistic)."""
    method = str(run.get("method") or MISSING)
    stopping = run.get("early_stopping", "none")
    return method if stopping == "none" else f"{method} [{_early_stopping(run).rstrip('‡')}]"


def format_interval(run: dict[str, Any], key: str) -> str:
    """'0.412 [0.380, 0.441]': the mean over seeds and its 95% interval (the mean alone when there is none)."""
    value, ci = run.get(key), run.get(f"{key}_ci")
    if value is None:
        return MISSING
    if not ci:
        return format_number(value)
    return f"{format_number(value)} [{format_number(ci[0])}, {format_number(ci[1])}]"


def format_seeds(run: dict[str, Any], key: str = "accuracy") -> str:
    """Every seed's value, '0.41 / 0.39 / 0.43' (empty with one seed)."""
    values = run.get(f"{key}_seeds") or []
    if len(values) < 2:
        return MISSING
    return " / ".join(MISSING if v is None else f"{v:.{DECIMALS - 1}f}" for v in values)


def format_pgr(run: dict[str, Any]) -> str:
    if run.get("pgr") is None:
        return UNDEFINED_REASONS.get(run.get("pgr_undefined"), PGR_UNDEFINED)
    return format_interval(run, "pgr")


def _ground_truth_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "params", "role", "method", "early stopping", "accuracy [95% CI]", "per seed"]
    rows = [
        [
            r["model"],
            format_params(results["models"][r["model"]].get("params")),
            r["role"],
            str(r.get("method") or MISSING),
            _early_stopping(r),
            format_interval(r, "accuracy"),
            format_seeds(r),
        ]
        for r in ground_truth_runs(results)
    ]
    return headers, rows


def _student_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["supervisor", "student", "method", "early stopping", "accuracy [95% CI]", "PGR [95% CI]",
               "agreement [95% CI]", "error agreement", "ceiling agreement", "per seed"]
    rows = []
    for r in student_runs(results):
        rows.append(
            [
                str(r["supervisor"]),
                r["model"],
                str(r.get("method") or MISSING),
                _early_stopping(r),
                format_interval(r, "accuracy"),
                format_pgr(r),
                format_interval(r, "agreement"),
                format_number(r.get("error_agreement")),
                format_number(r.get("ceiling_agreement")),
                format_seeds(r),
            ]
        )
    return headers, rows


def _gap_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The capability gap under each PGR: ceiling - weak on the same test examples, paired over seeds and test
    clusters (the interval that decides whether PGR is defined), once per weak/ceiling pair."""
    headers = ["weak", "ceiling", "ceiling - weak [95% CI, paired]"]
    model_of = {r["name"]: r["model"] for r in ground_truth_runs(results)}
    rows, seen = [], set()
    for r in student_runs(results):
        pair = (r.get("weak_run"), r.get("ceiling_run"))
        if r.get("gap") is None or pair in seen:
            continue
        seen.add(pair)
        rows.append([model_of.get(pair[0], str(pair[0])), model_of.get(pair[1], str(pair[1])),
                     format_interval(r, "gap")])
    return headers, rows


def median_pgr_by_method(results: dict[str, Any]) -> list[tuple[str, str, int, int, float | None]]:
    """(method, early stopping, pairs with a defined PGR, pairs, median PGR) per method and early stopping. A
    chain counts by its final step; its intermediate steps are students of the chain, not pairs of their own."""
    groups: dict[tuple[str, int, str], list[float | None]] = defaultdict(list)
    for r in student_runs(results):
        if r.get("chain_final") is False:
            continue
        groups[(str(r.get("method") or MISSING), _stopping_rank(r), _early_stopping(r))].append(r.get("pgr"))
    return [
        (method, stopping, sum(v is not None for v in values), len(values), median_pgr(values))
        for (method, _, stopping), values in sorted(groups.items())
    ]


def _summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["method", "early stopping", "pairs", "median PGR"]
    rows = [
        [method, stopping, f"{defined}/{total}", PGR_UNDEFINED if value is None else format_number(value)]
        for method, stopping, defined, total, value in median_pgr_by_method(results)
    ]
    return headers, rows


def _provenance(results: dict[str, Any]) -> list[str]:
    """Lines that say where the numbers come from: command, commit, seeds, test set, interval method."""
    lines = []
    if results.get("command"):
        lines.append(f"command: `{results['command']}`")
    if results.get("commit"):
        lines.append(f"commit: {results['commit']}")
    if results.get("seeds"):
        lines.append(f"seeds: {', '.join(str(s) for s in results['seeds'])}")
    if results.get("n_test"):
        lines.append(f"test set: {results['n_test']} examples in {results.get('test_clusters', '?')} clusters")
    if results.get("interval"):
        lines.append(f"intervals: {results['interval']}")
    return lines


def _footnotes(results: dict[str, Any]) -> list[str]:
    students = student_runs(results)
    notes = [NOTE_AGREEMENT] if students else []
    if any(r.get("pgr") is None for r in students):
        notes.append(FOOTNOTE_PGR)
    if any(r.get("early_stopping") == "ground_truth_oracle" for r in results["runs"]):
        notes.append(FOOTNOTE_ORACLE)
    return notes


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    numeric = [bool(rows) and all(_is_numeric(row[i]) for row in rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    numeric = [bool(rows) and all(_is_numeric(row[i]) for row in rows) for i in range(len(headers))]

    def line(cells):
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])


def _is_numeric(text: str) -> bool:
    """Right-aligned cells: numbers, intervals, per-seed lists and the missing marks."""
    if text in (MISSING, PGR_UNDEFINED) or text.startswith(PGR_UNDEFINED):
        return True
    return all(c.isdigit() or c in ".-/[], " for c in text) and any(c.isdigit() for c in text)


def _sections(results: dict[str, Any]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    sections = [("Trained on ground truth", _ground_truth_rows(results))]
    if student_runs(results):
        sections.append(("Weak-to-strong students", _student_rows(results)))
        gaps = _gap_rows(results)
        if gaps[1]:
            sections.append(("Capability gaps", gaps))
        sections.append(("Median PGR per method", _summary_rows(results)))
    return sections


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown tables: ground-truth runs, students, median PGR per method; then footnotes and notes."""
    check_results(results)
    parts = [f"# Weak-to-strong results: {results['task']}"]
    if _provenance(results):
        parts.append("\n".join(f"{line}  " for line in _provenance(results)))
    for title, (headers, rows) in _sections(results):
        parts.append(f"## {title}\n\n{_markdown_table(headers, rows)}")
    footnotes = _footnotes(results)
    if footnotes:
        parts.append("\n".join(f"{note}  " for note in footnotes))
    if results.get("notes"):
        parts.append("## Notes\n\n" + "\n".join(f"- {note}" for note in results["notes"]))
    return "\n\n".join(parts) + "\n"


def results_text(results: dict[str, Any]) -> str:
    """The same tables as plain aligned text for a terminal."""
    check_results(results)
    parts = [f"Weak-to-strong results: {results['task']}", "\n".join(_provenance(results))]
    for title, (headers, rows) in _sections(results):
        parts.append(f"{title}\n{_text_table(headers, rows)}")
    parts += _footnotes(results)
    parts += [f"note: {note}" for note in results.get("notes", [])]
    return "\n\n".join(parts) + "\n"


def print_table(results: dict[str, Any]) -> None:
    print(results_text(results), end="")


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def _size_axis(results: dict[str, Any]):
    """x position per model: its parameter count (log axis), or its rank when any count is missing."""
    models = results["models"]
    params = {name: info.get("params") for name, info in models.items()}
    if all(p is not None and p > 0 for p in params.values()):
        return {name: float(p) for name, p in params.items()}, True
    return {name: float(i) for i, name in enumerate(models)}, False


def _accuracy_figure(results: dict[str, Any]) -> Figure:
    """Test accuracy against model size: the ground-truth curve and one weak-to-strong curve per supervisor/method."""
    x_of, log_x = _size_axis(results)
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    ground_truth = defaultdict(dict)  # method label -> model -> accuracy (the ceiling's when a model has two runs)
    for r in sorted(ground_truth_runs(results), key=lambda r: r["role"] != "ceiling"):
        ground_truth[_method_label(r)].setdefault(r["model"], r)
    for label, runs in ground_truth.items():
        runs = sorted(runs.values(), key=lambda r: x_of[r["model"]])
        name = "ground truth" if len(ground_truth) == 1 else f"ground truth ({label})"
        ax.errorbar([x_of[r["model"]] for r in runs], [r["accuracy"] for r in runs], yerr=error_bars(runs, "accuracy"),
                    fmt="k-o", lw=2, capsize=3, label=name, zorder=3)

    curves = defaultdict(list)
    for r in student_runs(results):
        curves[(str(r["supervisor"]), _method_label(r))].append(r)
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for color, ((supervisor, method), runs) in zip(colors, curves.items()):
        runs = sorted(runs, key=lambda r: x_of[r["model"]])
        start = supervisor_run(results, supervisor)
        if start is not None:
            runs = [start] + runs
        ax.errorbar([x_of[r["model"]] for r in runs], [r["accuracy"] for r in runs], yerr=error_bars(runs, "accuracy"),
                    fmt="--o", color=color, capsize=3, label=f"{supervisor} → students, {method}")

    if log_x:
        ax.set_xscale("log")
        ax.set_xlabel("model parameters")
    else:
        ax.set_xticks(list(x_of.values()), list(x_of))
        ax.set_xlabel("model")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results['task']}: weak-to-strong accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def error_bars(runs: Sequence[dict[str, Any]], key: str):
    """Error bars [2, n] from the runs' 95% intervals (zero where a run has none)."""
    lower, upper = [], []
    for r in runs:
        ci = r.get(f"{key}_ci")
        value = r.get(key) or 0.0
        lower.append(value - ci[0] if ci else 0.0)
        upper.append(ci[1] - value if ci else 0.0)
    return [lower, upper]


def _pgr_figure(results: dict[str, Any]) -> Figure:
    """PGR per method with 95% intervals, one group of bars per supervisor -> student pair; undefined PGRs are
    marked n/a, and a plot with no defined PGR says why in its middle."""
    students = student_runs(results)
    pairs = list(dict.fromkeys((str(r["supervisor"]), r["model"]) for r in students))
    methods = list(dict.fromkeys(_method_label(r) for r in students))
    value = {(str(r["supervisor"]), r["model"], _method_label(r)): r.get("pgr") for r in students}
    run = {(str(r["supervisor"]), r["model"], _method_label(r)): r for r in students}

    fig = Figure(figsize=(max(5, 1.2 * len(pairs) * max(1, len(methods)) ** 0.5 + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(pairs))]
        heights = [value.get((s, m, method)) for s, m in pairs]
        runs = [run.get((s, m, method), {}) for s, m in pairs]
        ax.bar(xs, [0.0 if h is None else h for h in heights], width, yerr=error_bars(runs, "pgr"), capsize=3,
               color=f"C{j % 10}", label=method)
        for x, h, pair in zip(xs, heights, pairs):
            if h is None and (*pair, method) in value:
                ax.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize="small")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    if all(v is None for v in value.values()):
        reasons = sorted({r.get("pgr_undefined") or "ceiling not above weak" for r in students})
        ax.text(0.5, 0.5, "no PGR is defined:\n" + "; ".join(reasons) + "\n(see results.md)",
                transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks(range(len(pairs)), [f"{s} → {m}" for s, m in pairs], rotation=20, ha="right")
    ax.set_ylabel("PGR")
    ax.set_title(f"{results['task']}: performance gap recovered")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def make_plots(results: dict[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Write accuracy_vs_size.png (and pgr_by_method.png when there are students) to out_dir; return the paths."""
    check_results(results)
    os.makedirs(out_dir, exist_ok=True)
    figures = {"accuracy_vs_size.png": _accuracy_figure(results)}
    if student_runs(results):
        figures["pgr_by_method.png"] = _pgr_figure(results)
    paths = []
    for filename, fig in figures.items():
        path = os.path.join(os.fspath(out_dir), filename)
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def write_report(results: dict[str, Any], workdir: str | os.PathLike) -> list[str]:
    """Write workdir/results.json (atomically), workdir/results.md and workdir/plots/*.png; return the paths."""
    check_results(results)
    workdir = os.fspath(workdir)
    json_path = os.path.join(workdir, "results.json")
    md_path = os.path.join(workdir, "results.md")
    atomic_write_text(json_path, to_json(results, indent=2) + "\n")
    atomic_write_text(md_path, results_markdown(results))
    return [json_path, md_path] + make_plots(results, os.path.join(workdir, "plots"))
