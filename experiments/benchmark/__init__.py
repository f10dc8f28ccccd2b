"""Speed of camu_jax: against the PyTorch port of the reference, and populations against runs one
at a time. `python -m experiments.benchmark --help` lists the flags; docs/benchmarks.md the method.

Modules: `cli` (flags, which sections run, the JSON file), `env` (machine and versions), `timing`
(A/B alternation, medians, compile seconds), `data` (MNIST or synthetic data, splits, shared
weights), `steps` (the CaMU double step), `end_to_end` (the reference's "time"), `evaluation`
(one accuracy pass), `memory` (peak memory, one subprocess per side), `study` (a whole study,
population against sequential, each in its own process), `reference_study` (the PyTorch port's
per-run times multiplied out to a study), `table` (the printed tables).
"""
