"""What the notebooks show: plots, result analysis, players, a look inside the model, the
verification notebook's session."""
