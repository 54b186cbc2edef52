"""The agent side of the ETO protocol: prompt layout, action parsing, expert trajectories."""

from etokit.agent.protocol import (
    INVALID_FORMAT_OBS,
    STOP_STRINGS,
    build_prompt,
    expert_thought,
    expert_trajectory,
    format_observation,
    load_icl,
    load_instruction,
    parse_action,
    task_turn,
)

__all__ = [
    "INVALID_FORMAT_OBS",
    "STOP_STRINGS",
    "build_prompt",
    "expert_thought",
    "expert_trajectory",
    "format_observation",
    "load_icl",
    "load_instruction",
    "parse_action",
    "task_turn",
]
