"""What a run tells its user: the console, the tracker (W&B), ``report.md`` and its plots, the sweep table.
``python -m expertchat.report RUN_DIR`` rebuilds a run folder's report (or a sweep's)."""
