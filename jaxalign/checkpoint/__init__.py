"""Weights on disk: Orbax checkpoints of a run (store) and loading any model source into a sharded
model: an HF dir, a checkpoint step, a run dir's best (model_io)."""
