"""Benchmarks: what `python -m tc_lite bench` and `scripts/gpu_check.sh` run.

* `memory`: `bench memory` (the estimate, and real steps through the Recipe on CUDA: `run_steps`, `measure_peak`);
* `speed`: `bench speed` (the Renderer against diffusers, the TrainStep against its parts, the prefix cache);
* `models`, `random_rewards`: models built in code with random weights (tiny, mid, full-size SD1.5 and its
  rewards), so every benchmark runs without a download;
* `gpu_check`, `gpu_checks`: one command that validates the GPU paths on a CUDA machine and writes
  `benchmarks/gpu/<device>.json` and `.md` (a quick CPU subset elsewhere).
"""
