"""What a run needs around the loop: the run folder, optimisers and learning-rate schedules, the notebook launcher."""
