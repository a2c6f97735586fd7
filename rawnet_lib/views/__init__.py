"""What the notebooks show: plots, result analysis, players, the verification notebook's session."""
