"""Training: the loop, its objectives, exact resume, the run folder, DDP and the periodic jobs."""
