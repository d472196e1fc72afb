"""User-facing errors: one line that names the problem and the fix.

The CLI prints them without a traceback; the HTTP API maps them to 4xx responses.
"""


class CoeError(Exception):
    """An error caused by input or set-up, not by a bug: say what is wrong and how to fix it."""

    status_code = 400

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)

    def __reduce__(self):  # pickles with problem and fix apart (errors travel between Ray processes)
        return (type(self), (self.problem, self.fix))


class UnknownNameError(CoeError):
    """An expert, policy, router, backend or aggregator name that is not registered."""

    status_code = 404


class ConfigError(CoeError):
    """A malformed catalog or config file."""


class WeightsMissingError(CoeError):
    """Weights that cannot be found: usually a weight package that is not installed."""

    status_code = 503


class PoolCapacityError(CoeError):
    """Experts that cannot fit in the memory pool's budgets, or wait too long for room."""

    status_code = 503


class PromptTooLongError(CoeError):
    """A prompt longer than the expert's context: the request's fault, not the expert's."""


class UnsupportedFieldError(CoeError):
    """A request field (tools, response_format, logprobs, n) that no expert it may go to supports:
    a 400 that names the field (`param`)."""

    def __init__(self, problem: str, param: str, fix: str | None = None):
        super().__init__(problem, fix)
        self.param = param

    def __reduce__(self):
        return (type(self), (self.problem, self.param, self.fix))


class AdapterError(CoeError):
    """A LoRA adapter that is missing or does not fit its base (rank, modules): fails its requests only."""

    status_code = 422


class OverloadedError(CoeError):
    """The service's queues are full: retry after `retry_after` seconds."""

    status_code = 503

    def __init__(self, problem: str = "the service is at capacity; retry after a moment", fix: str | None = None,
                 retry_after: int = 1):
        super().__init__(problem, fix)
        self.retry_after = retry_after

    def __reduce__(self):  # survives pickling across Ray with its retry_after
        return (type(self), (self.problem, self.fix, self.retry_after))


class InternalError(CoeError):
    """A bug, not the request's fault: the details are in the server log, never in the response."""

    status_code = 500


class ExpertsFailedError(CoeError):
    """Every expert that could answer a query failed: the service is degraded, not the request."""

    status_code = 503


def unknown(kind: str, name: str, known) -> UnknownNameError:
    known = sorted(known)
    return UnknownNameError(f"unknown {kind} {name!r}", f"choose one of: {', '.join(known)}")


def first_problem(exc, top_level: str = "") -> str:
    """A pydantic ValidationError in one line: where its first error is (dotted path; `top_level`
    when it is the whole document) and what it says, with how many more there are."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or top_level
    more = f" ({exc.error_count()} errors)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"
