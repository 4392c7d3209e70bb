"""Expected, user-facing errors.

Anything raised as MintError is a problem with the user's input (a path, a budget, a corrupt file). The CLI
prints its message on one line and exits non-zero without a traceback. Anything else is a bug.
"""


class MintError(Exception):
    """An expected error; its message names the file, tensor and numbers involved."""


class InfeasibleBudget(MintError):
    """The budget is below the smallest size any allocation can reach. The solver sets the three figures (the
    smallest reachable bytes, the budget asked, the rows whose floors weigh most); other raisers may not."""

    min_bytes: int
    budget: int
    floor_rows: list[int]
