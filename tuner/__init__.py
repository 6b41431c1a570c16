"""Driver side of moe-tune: CLI, model shapes, search spaces, planning, Ray driver, outputs."""
