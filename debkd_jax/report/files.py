"""The report files: a results JSON with its Markdown and figures, written through the one atomic write and
never overwriting a different older report; `render` rebuilds them from the JSON alone."""

from __future__ import annotations

import csv
import io
import os

from debkd_jax import workdir_lib
from debkd_jax.report import markdown, plots
from debkd_jax.report.results import read_results, without_meta


def write_report(workdir: str, basename: str, results: dict, markdown_text: str, figures: dict) -> None:
    """`<basename>.json`, `<basename>.md` and each figure (`{file name: plot(results, path)}`).

    Reports are never overwritten: an older, different JSON is kept, with its Markdown and figures, as
    `<name>.<time>.<ext>`; identical results (a re-run that reused every finished run) leave the files as
    they are."""
    json_path = os.path.join(workdir, f"{basename}.json")
    md_path = os.path.join(workdir, f"{basename}.md")
    paths = [json_path, md_path, *(os.path.join(workdir, name) for name in figures)]
    old = workdir_lib.read_json(json_path)
    if old is not None and without_meta(old) == without_meta(workdir_lib.jsonable(results)):
        if all(os.path.exists(p) for p in paths):
            return
    elif os.path.exists(json_path):
        for src in paths:
            workdir_lib.keep_aside(src)
    workdir_lib.write_json(json_path, results)
    workdir_lib.atomic_write_bytes(md_path, markdown_text.encode())
    for name, plot in figures.items():
        plot(results, os.path.join(workdir, name))


def write_results(workdir: str, results: dict, basename: str = "results") -> None:
    """The main job's report: `results.json`, `results.md`, `test_accuracy.png` and `val_accuracy.png`."""
    figures = {"test_accuracy.png": plots.plot_test_accuracy, "val_accuracy.png": plots.plot_val_accuracy}
    write_report(workdir, basename, results, markdown.results_markdown(results), figures)


def write_sweep_results(workdir: str, basename: str, results: dict) -> None:
    """A sweep's report: `<basename>.json`, `.md` and `.png`."""
    write_report(
        workdir,
        basename,
        results,
        markdown.sweep_markdown(results, basename),
        {f"{basename}.png": plots.plot_sweep},
    )


def write_comparison(out_dir: str, comparison: dict) -> list[str]:
    """`comparison.json`, `comparison.md` and `comparison.png` in `out_dir` (an older, different comparison
    there is kept aside). Returns the paths."""
    write_report(
        out_dir,
        "comparison",
        comparison,
        markdown.comparison_markdown(comparison),
        {"comparison.png": plots.plot_comparison},
    )
    return [os.path.join(out_dir, f) for f in ("comparison.json", "comparison.md", "comparison.png")]


def write_skipped_csv(skipped, path: str) -> None:
    """`path,reason` rows, one per unreadable file, written atomically."""
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["path", "reason"])
    out.writerows(skipped)
    workdir_lib.atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def render(json_path: str) -> list[str]:
    """Regenerates the Markdown report and the plots beside a main job's `results.json` from that file alone
    (they are derived from it, so they are rewritten). Returns the paths written."""
    results = read_results(json_path)
    directory = os.path.dirname(os.path.abspath(json_path))
    basename = os.path.splitext(os.path.basename(json_path))[0]
    md_path = os.path.join(directory, f"{basename}.md")
    workdir_lib.atomic_write_bytes(md_path, markdown.results_markdown(results).encode())
    written = [md_path]
    figures = (("test_accuracy.png", plots.plot_test_accuracy), ("val_accuracy.png", plots.plot_val_accuracy))
    for name, plot in figures:
        written.append(os.path.join(directory, name))
        plot(results, written[-1])
    return written
