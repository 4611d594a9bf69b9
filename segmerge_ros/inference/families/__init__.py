"""The model families the engine serves, one module each; ``registry.family_for`` picks one from a model name."""
