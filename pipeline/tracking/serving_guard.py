"""Limits and error hygiene of the served model (`mlflow models serve`): the model file's guard.

`serving_model.ResDxModel` calls `validate_batch` before the network runs (numeric, the plan's
shape, finite, at most `max_batch()` cases when served) and, once loaded in the scoring server,
`install_request_guard`: a request-size limit in front of ``/invocations`` (413) and error bodies
without stack traces or echoed input. The README's "Serving limits" table lists the numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys

import numpy as np
from mlflow.exceptions import MlflowException

# Cases per served request. The network runs 4 at a time anyway (Classifier batch_size), so a larger
# request only holds memory and the single uvicorn worker for longer; MLflow's request timeout
# (60 s) answers 504 but does not stop the worker thread, so an unbounded batch keeps running after it.
MAX_BATCH = 16
MAX_BATCH_ENV = "RESDX_SERVE_MAX_BATCH"
MAX_REQUEST_BYTES_ENV = "RESDX_SERVE_MAX_REQUEST_BYTES"
# A float32 sent as JSON by `ndarray.tolist()` is a float64 repr: at most 24 characters with its
# separator ("-1.2345678901234567e-05, "); 32 leaves room for whitespace and brackets.
JSON_BYTES_PER_VALUE = 32
REQUEST_OVERHEAD_BYTES = 1 << 20
# The serving flag MLflow's scoring server sets (mlflow.pyfunc.scoring_server.init; also set by
# `mlflow models predict`). In-process callers (the register stage scores a whole test set through
# `PyFuncModel.predict`) are not limited in batch size.
_SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
_MAX_MESSAGE_CHARS = 1000
_log = logging.getLogger("resdx.serving")


def _positive_int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:  # a typo must not silently lift the limit: fail when the model loads
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def max_batch() -> int:
    """Cases per served request: $RESDX_SERVE_MAX_BATCH, else `MAX_BATCH`."""
    return _positive_int_env(MAX_BATCH_ENV, MAX_BATCH)


def default_max_request_bytes(item_shape: tuple[int, ...], batch: int) -> int:
    """What `batch` cases of `item_shape` take as JSON at full float precision, plus 1 MiB:
    the limit then never rejects a request that the batch limit would accept."""
    return batch * math.prod(item_shape) * JSON_BYTES_PER_VALUE + REQUEST_OVERHEAD_BYTES


def max_request_bytes(item_shape: tuple[int, ...], batch: int) -> int:
    """Request body size limit in bytes: $RESDX_SERVE_MAX_REQUEST_BYTES, else the default above."""
    return _positive_int_env(MAX_REQUEST_BYTES_ENV, default_max_request_bytes(item_shape, batch))


def _invalid(message: str) -> MlflowException:
    # No stack_trace kwarg: the scoring server serializes an MlflowException as {"error_code", "message",
    # ...its kwargs}; only the exceptions it wraps itself carry a traceback into the body.
    return MlflowException.invalid_parameter_value(message)


def validate_batch(images, item_shape: tuple[int, ...], limit: int | None = None) -> np.ndarray:
    """The checks of the tensor path, cheapest first; returns the batch as float32.

    `item_shape` is one case's (C, X, Y, Z) (2D models: (C, X, Y)); `limit` the most cases allowed
    (None: any). Raises `MlflowException` (INVALID_PARAMETER_VALUE) with a fixed message that holds
    numbers only: no input values, no paths.
    """
    x = np.asarray(images)
    if x.dtype.kind not in "iuf":  # object (strings, ragged lists), bool, complex
        raise _invalid("input must be a numeric array (float32)")
    expected = tuple(int(n) for n in item_shape)
    if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        dims = ", ".join(str(n) for n in expected)
        raise _invalid(f"input must have shape (N, {dims}); got {tuple(int(n) for n in x.shape)}")
    if limit is not None and len(x) > limit:
        raise _invalid(f"batch of {len(x)} cases exceeds the limit of {limit} cases per request")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: caught just below
        x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise _invalid("input contains non-finite values (NaN or Inf); send preprocessed, finite tensors")
    return x


def in_serving_environment() -> bool:
    """True inside MLflow's scoring server (`mlflow models serve`, `mlflow models predict`)."""
    return os.environ.get(_SERVING_ENV, "").strip().lower() in ("true", "1")


def _scrub(err: MlflowException) -> None:
    """Make an error body safe to send: no stack trace, no echo of the request.

    MLflow's scoring server puts ``traceback.format_exc()`` (server paths: the virtualenv, the model
    folder under mlruns) into ``stack_trace`` of any non-MLflow error from `predict`, and prefixes
    MLflow errors with ``Failed to predict data '<the input>'``; invalid JSON is echoed whole.
    The trace goes to the server log instead.
    """
    kwargs = getattr(err, "json_kwargs", None)
    if isinstance(kwargs, dict) and kwargs.get("stack_trace"):
        _log.error("prediction failed (stack trace kept out of the response):\n%s", kwargs.pop("stack_trace"))
    msg = str(getattr(err, "message", "") or "")
    # The formats of mlflow.pyfunc.scoring_server.invocations / _decode_json_input and
    # mlflow.pyfunc._validate_prediction_input (3.17); a message in another format is only capped.
    head, sep, tail = msg.partition("'. \nError: ")
    if sep and head.startswith("Failed to predict data '"):
        msg = "Failed to predict: " + tail
    head, sep, tail = msg.partition("Failed to enforce schema of data '")
    if sep:
        _, sep, rest = tail.partition("' with schema '")
        schema, sep2, why = rest.partition("'. Error: ")
        if sep and sep2:  # keep the schema (it names the expected shape) and the reason, not the data
            msg = f"{head}input does not match the model's schema {schema}: {why}"
    head, sep, _ = msg.partition("\nInput: ")
    if sep and "valid JSON formatted string" in head:
        msg = head
    if len(msg) > _MAX_MESSAGE_CHARS:
        msg = msg[:_MAX_MESSAGE_CHARS] + " [truncated]"
    err.message = msg


class _TooLarge(Exception):
    pass


def _too_large(limit: int):
    from starlette.responses import Response

    body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                       "message": f"request body exceeds the limit of {limit} bytes"})
    return Response(content=body, status_code=413, media_type="application/json")


def _guard_endpoint(endpoint, limit: int):
    """`endpoint` (MLflow's /invocations handler) behind the request-size limit and `_scrub`."""
    from starlette.requests import Request

    @functools.wraps(endpoint)  # FastAPI reads the handler's signature (request: Request) through this
    async def guarded(request, *args, **kwargs):
        declared = request.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            # Answered before a byte of the body is read. Uvicorn (h11) then drops the rest of the
            # body as it arrives (the cycle is done), so the client can still read the 413.
            return _too_large(limit)
        received = 0
        receive = request.receive

        async def counted():  # chunked uploads (no Content-Length): stop at the limit, not at the end
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        try:
            return await endpoint(Request(request.scope, counted), *args, **kwargs)
        except _TooLarge:
            return _too_large(limit)
        except MlflowException as err:
            _scrub(err)
            raise

    return guarded


def install_request_guard(limit: int) -> bool:
    """Put a request-size limit (and `_scrub`) in front of the scoring server's /invocations.

    Why from here: ``mlflow models serve`` (MLflow 3.17) runs ``uvicorn mlflow.pyfunc.scoring_server.app:app``
    and offers a timeout (``-t`` / MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT) and a worker count, but no
    body-size limit; neither has uvicorn (its h11 size option bounds headers only), and the handler reads
    the whole body (``await request.body()``) before anything can look at it. The only code of ours that
    runs in that process is this file, and it runs while ``app.py`` loads the model, just before
    ``scoring_server.init`` builds the app and decorates the handler with
    ``_async_catch_mlflow_exception``: wrapping that decorator puts the limit in front of the handler.
    A reverse proxy limit (nginx ``client_max_body_size``) is still the right outer layer.
    Returns False (and warns) where the scoring server is absent or no longer has that hook:
    tests/test_serving_limits.py then fails, rather than the limit silently vanishing.
    """
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    if server is None:  # not a scoring-server process (training, register, resdx predict)
        return False
    current = getattr(server, "_async_catch_mlflow_exception", None)
    if current is None:
        _log.warning("mlflow.pyfunc.scoring_server has no _async_catch_mlflow_exception: the ResDx "
                     "request-size limit is not enforced; put a proxy body limit in front of the server")
        return False
    original = getattr(current, "_resdx_original", current)  # idempotent: one guard, the latest limit

    def guarded_catch(func):
        return original(_guard_endpoint(func, limit))

    guarded_catch._resdx_original = original
    server._async_catch_mlflow_exception = guarded_catch
    return True
