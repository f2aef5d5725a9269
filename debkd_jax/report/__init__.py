"""What a person reads after a job, for `main` and sweeps alike, generated from the results JSON alone.

    results.py    the results JSON: mean/std over seeds, paired differences, two runs compared, reading it back
    markdown.py   the reports and tables (Markdown)
    plots.py      the figures (PNG)
    files.py      writing a report (never over a different older one), `render` from the JSON alone

Console progress is `debkd_jax.console`; the per-epoch metric record is `training.MetricWriter`.
"""

from debkd_jax.report.files import (
    render,
    write_comparison,
    write_report,
    write_results,
    write_skipped_csv,
    write_sweep_results,
)
from debkd_jax.report.markdown import (
    NO_TEACHER_TEST,
    TABLE_METRICS,
    comparison_markdown,
    headline_table,
    markdown_table,
    metric_cells,
    paired_table,
    results_markdown,
    results_table,
    stat_cell,
    sweep_markdown,
    sweep_table,
    verdict,
)
from debkd_jax.report.plots import (
    plot_comparison,
    plot_sweep,
    plot_test_accuracy,
    plot_val_accuracy,
    save_figure,
)
from debkd_jax.report.results import (
    REFERENCES,
    compare_results,
    dataset_summary,
    paired_differences,
    read_results,
    seed_summary,
    summarize,
    sweep_summary,
)

__all__ = [
    "NO_TEACHER_TEST",
    "REFERENCES",
    "TABLE_METRICS",
    "compare_results",
    "comparison_markdown",
    "dataset_summary",
    "headline_table",
    "markdown_table",
    "metric_cells",
    "paired_differences",
    "paired_table",
    "plot_comparison",
    "plot_sweep",
    "plot_test_accuracy",
    "plot_val_accuracy",
    "read_results",
    "render",
    "results_markdown",
    "results_table",
    "save_figure",
    "seed_summary",
    "stat_cell",
    "summarize",
    "sweep_markdown",
    "sweep_summary",
    "sweep_table",
    "verdict",
    "write_comparison",
    "write_report",
    "write_results",
    "write_skipped_csv",
    "write_sweep_results",
]
