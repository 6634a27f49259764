"""The pure core: policy, config model and validation, explanations. No I/O."""
