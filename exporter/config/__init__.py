"""The settings model and how it is loaded (YAML file, environment, flags)."""
