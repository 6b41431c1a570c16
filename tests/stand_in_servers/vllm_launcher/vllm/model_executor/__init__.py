"""Stand-in of a vLLM package whose ``__init__`` cannot import on this host (as on a GPU host
lacking vLLM's server dependencies): only the fused-MoE module file itself imports."""

import a_server_dependency_this_host_lacks  # noqa: F401
