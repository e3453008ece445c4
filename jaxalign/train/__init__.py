"""The math of a training step: losses, the objective of each stage, the jitted step and the optimizer."""
