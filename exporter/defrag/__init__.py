"""The defrag engine (plan, then execute, one member at a time) and its locks."""
