"""Judging a model: held-out metrics and the gate (evaluate), log-prob scoring (score), sampling
(generate), on-policy pairs (pairs), the base/SFT/DPO report (report), and task checks (tasks)."""
