"""The jobs: one module per `--mode` (train, sample, evaluate, extract, sweep, demo) and their helpers
(train_report, stage_eval: what training reports and looks at; sweep_sampler, frontier: the sweep's
sampler and its cost/quality front). Jobs run the method (msf_jax.stages, pipeline, train_step, ...)
on msf_jax.runtime; nothing below imports a job.
"""
