"""copilot_here secure proxy runtime: policy core, interceptor, init and host CLI."""
