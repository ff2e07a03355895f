"""The pure core: the domain model, the rule language, policy, alert decisions and run results.

No module here does I/O (an import-linter contract in pyproject.toml keeps it so)."""
