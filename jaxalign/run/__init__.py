"""Building and running a stage: set-up from the config (build), the loop (loop), the run dir's status
and manifest (lifecycle), checkpoints and best-by-validation (resume), metrics.jsonl (metrics)."""
