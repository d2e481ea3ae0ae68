"""What every application (the CLI, the chat screen, the server) does before its first request:
command-line options -> a loaded `Runtime`, and `--mode auto`'s calibration table and choice.
Imports the embedding API and below, never an application."""
