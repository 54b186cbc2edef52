"""Rollouts: a policy plays the tasks of environment splits, each episode recorded as a trajectory.

- ``play``: the one path of `etokit explore`, `etokit eval` and the run's explore and eval stages
  (several splits in one pool of episodes, each in its own file; environments, resume, processes,
  order, environment errors, progress);
- ``jobs``: the episodes to play (task, sample, step-wise prefix), their plan and sharding, and the
  expert trajectories step-wise jobs replay;
- ``episodes``: the episode loop (continuous batching over live episodes, retries, step-wise prefixes);
- ``generator``: decoding options and batched generation for one model; ``slot_pool`` (the
  default on CPU), ``kv_reuse`` and ``slot_cache`` keep each episode's KV cache between steps;
  ``vllm_engine`` the same with vLLM.
"""
