"""One exception type for mistakes a user can fix: the CLI prints it as one line, exit code 2."""


class UserError(Exception):
    """A bad input (flag, path, checkpoint) explained in one line that says how to fix it."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient; names the step so the run can be inspected."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}; the last good checkpoint was kept")
        self.step = step
