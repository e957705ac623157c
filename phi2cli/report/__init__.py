"""Reports: training-run summaries, their rendering, plots and ROUGE metrics (no torch)."""
