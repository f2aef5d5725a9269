"""What a person reads after a job, for `main` and sweeps alike, generated from the results JSON alone.

    results.py    the results JSON: mean/std over seeds, paired differences, two runs compared, read back
    markdown.py   the reports and tables (Markdown)
    plots.py      the figures (PNG)
    files.py      writing a report (never over a different older one), `render` from the JSON alone
    paper.py      a paper study's report: the DeBKD paper's numbers beside the study's own
    paper_tables.py  the DeBKD paper's Tables 1 and 3, its stated gains and claims, as data

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
from debkd_jax.report.paper import (
    paper_study,
    paper_study_markdown,
    render_paper_study,
    write_paper_study,
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
    "paper_study",
    "paper_study_markdown",
    "plot_comparison",
    "plot_sweep",
    "plot_test_accuracy",
    "plot_val_accuracy",
    "read_results",
    "render",
    "render_paper_study",
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
    "write_paper_study",
    "write_report",
    "write_results",
    "write_skipped_csv",
    "write_sweep_results",
]
