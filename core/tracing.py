"""OpenTelemetry spans, so one slow request can be followed from the ingress through the router
and the pool to the backend. Off unless `serve.tracing` names an OTLP endpoint, and a no-op
wherever the `tracing` extra (opentelemetry-sdk and its OTLP exporter) is not installed: callers
wrap their steps in `span(...)` either way.

Spans nest within one process through OpenTelemetry's context (threads and Ray calls do not carry
it): hand `carrier()` along with the request (a small dict, W3C traceparent) and open the next
step's span with `span(name, carrier=...)` on the other side.

The tracer provider is this module's own, not OpenTelemetry's global one, so configuring coe's
tracing neither clashes with nor overrides a provider the embedding application set.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from core.config import TracingConfig

logger = logging.getLogger("coe.tracing")

_tracer = None
_provider = None


def configure(settings: TracingConfig | None, exporter=None) -> bool:
    """Start exporting spans; True when tracing is on. `exporter`: a span exporter of the SDK to
    use instead of OTLP (spans are then exported as each ends, e.g. to an in-memory exporter)."""
    shutdown()
    if settings is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        logger.warning("serve.tracing is set but OpenTelemetry is not installed; no spans are exported "
                       "(pip install 'coe[tracing]')")
        return False
    global _tracer, _provider
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}),
                              sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
    _provider, _tracer = provider, provider.get_tracer("coe")
    logger.info("tracing: spans go to %s over OTLP %s", settings.endpoint, settings.protocol)
    return True


def _otlp_exporter(settings: TracingConfig):
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(endpoint=settings.endpoint, headers=settings.headers or None)


def enabled() -> bool:
    return _tracer is not None


def flush(timeout_s: float = 5.0) -> None:
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Export what is pending and stop tracing."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def _attribute(value):
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, bool | int | float | str) for v in value):
        return list(value)
    return str(value)


def _propagator():
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


@contextmanager
def span(name: str, carrier: dict | None = None, **attributes) -> Iterator:
    """A span around a step (None is yielded when tracing is off). It is the child of the current
    span, or of the span that made `carrier` in another thread or process. An exception leaving
    the block is recorded on the span and marks it as an error."""
    if _tracer is None:
        yield None
        return
    parent = _propagator().extract(carrier) if carrier else None
    clean = {k: _attribute(v) for k, v in attributes.items() if v is not None}
    with _tracer.start_as_current_span(name, context=parent, attributes=clean) as current:
        yield current


def carrier() -> dict:
    """The current span's context as a small dict of strings, to travel with a request to another
    thread or process (the W3C `traceparent`); empty when tracing is off or no span is open."""
    if _tracer is None:
        return {}
    headers: dict[str, str] = {}
    _propagator().inject(headers)
    return headers


def traced(name: str | None = None):
    """A decorator: the function (sync or async) runs inside a span named `name` or after it."""

    def wrap(fn):
        label = name or fn.__qualname__
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*args, **kwargs):
                with span(label):
                    return await fn(*args, **kwargs)

            return run_async

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with span(label):
                return fn(*args, **kwargs)

        return run

    return wrap
