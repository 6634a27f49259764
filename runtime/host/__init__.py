"""What runs on the host: the copilot_here CLI, run plans, the sandbox engine."""
