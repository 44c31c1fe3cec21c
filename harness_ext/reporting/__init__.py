"""Results in, tables out: results/sample readers, leaderboards, plots, HTML and the statistical gate."""
