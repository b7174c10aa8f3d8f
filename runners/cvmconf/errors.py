"""One-line errors with distinct exit codes (documented in README.md)."""

EXIT_OK = 0            # every exercised requirement conforms
EXIT_NONCONFORMANCE = 1
EXIT_USAGE = 2         # bad arguments, bad input files, missing /dev/kvm or permissions
EXIT_HARNESS = 3       # the harness itself broke (build failed, a binary is missing or unusable)


class CvmconfError(Exception):
    """An error reported to the user as one line, with a specific exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CvmconfError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class HarnessError(CvmconfError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_HARNESS)
