"""Run directories: their layout and lock (rundir), checkpoints (checkpoints), loading a run's model (loading)."""
