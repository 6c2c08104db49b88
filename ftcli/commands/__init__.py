"""What each command does, one module per command that does more than call one function; the CLI
(ftcli.cli) parses and prints, these do the work."""
