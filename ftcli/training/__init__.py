"""Training: the recipe (recipe.py) hands a TrainJob (job.py) to a backend (loop/, trainer.py),
which trains on the objective (objective.py) with the optimizer (optim.py)."""
