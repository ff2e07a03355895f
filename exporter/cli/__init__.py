"""The command line: argument parsing, the commands, and their output."""
