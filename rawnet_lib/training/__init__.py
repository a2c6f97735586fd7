"""What a run needs around the loop: ranks and devices, the run folder, learning-rate schedules, the notebook launcher."""
