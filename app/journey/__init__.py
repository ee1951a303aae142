"""A journey: a model's whole path (import, pretraining, SFT, DPO or reward + GRPO, merge, convert, quantize)
written down once in YAML and run as one command, with an evaluation after every stage.

plan.py reads and checks the file, keys.py says which stages are already done, stages.py turns
each stage into the crofter command that does it, runner.py runs them, report.py writes the
report. Every stage runs as its own `crofter` child process: the same command a user would type,
so a journey does nothing the separate commands do not, and a crash in one stage loses only it.
"""
