"""Stand-in of vLLM's fused_moe package: its ``override_config`` / ``get_config`` pair."""

from stand_in_moe_math import get_config, override_config  # noqa: F401
