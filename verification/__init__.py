"""The middle floor's efficient verification: stage 1 (warmup + stable) trained once, per-candidate decay anneals
against a baseline anneal, evaluation, decisions and the report. Runs on ``model``; the job that schedules the
runs on Ray is ``pipelines.verify``."""
