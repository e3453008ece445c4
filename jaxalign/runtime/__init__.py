"""What every layer runs on: file paths (local or gs://), processes (multi-host), the device mesh and
logical sharding rules, stop signals, and the one-run-per-dir lock."""
