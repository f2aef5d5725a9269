"""The DeBKD paper's study at its scale: `python -m results.paper.run_study` (docs/paper.md)."""
