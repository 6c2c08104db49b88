"""The one error type users see: a message naming the problem and, when known, the fix."""


class FtcliError(Exception):
    """A user-facing error: printed as one line (plus the hint) and exit code 2, never a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class TrainingInterrupted(FtcliError):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint: the shell's 128 + signal number."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
