"""Reward-model benchmarks scored with rmserve's offline job (`rmserve eval ...`).

rewardbench.py   RewardBench (v1): rows, pair results, sections and Score as the official code has them
rewardbench2.py  RewardBench 2: rows, best-of-N results, the Ties score, the overall score
job.py           one offline job per benchmark run, then the official scores (OUTPUT.results.json)
cli.py           the `rmserve eval` subcommand

Importing this package is cheap (the CLI imports eval.cli): `from rmserve.eval.job import EvalConfig, run_eval`.
"""
