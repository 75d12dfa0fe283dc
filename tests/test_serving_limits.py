"""Hostile input to the served model: non-finite values, oversized batches and bodies, error bodies
without stack traces or server paths. The validation in-process first (fast), then one real
`mlflow models serve` of the registered champion for all HTTP checks."""
# ruff: noqa: F811 - `served` is test_predict_serve's fixture, imported to reuse it: tests name it as a parameter

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers import mlflow_serve
from mlflow.exceptions import MlflowException
from test_predict_serve import CHAMPION, _load, _post, served  # noqa: F401

from pipeline.tracking import serving_guard as S

ITEM = (1, 24, 24, 24)  # tiny_ingested's tensors
SERVE_BATCH = 3  # a small served batch limit keeps the over-limit request small


# ---------------------------------------------------------------------- in-process: the checks themselves
def test_a_finite_batch_passes_as_float32():
    x = np.zeros((2, *ITEM), dtype=np.float64)
    out = S.validate_batch(x, ITEM, limit=2)
    assert out.dtype == np.float32 and out.shape == (2, *ITEM)
    assert S.validate_batch(np.zeros((0, *ITEM), np.float32), ITEM, limit=2).shape == (0, *ITEM)
    assert S.validate_batch(np.zeros((40, *ITEM), np.float32), ITEM, limit=None).shape[0] == 40  # in-process


def _bad(value, index=(0, 0, 1, 2, 3)):
    x = np.zeros((1, *ITEM), dtype=np.float64)
    x[index] = value
    return x


@pytest.mark.parametrize(("images", "expected"), [
    (_bad(np.nan), "non-finite"),
    (_bad(np.inf), "non-finite"),
    (_bad(-np.inf), "non-finite"),
    (_bad(1e39), "non-finite"),  # finite in float64, inf once cast to the model's float32
    (np.full((1, *ITEM), "NaN", dtype=object), "numeric"),
    (np.zeros((1, *ITEM), dtype=bool), "numeric"),
    (np.zeros((1, 1, 8, 8, 8), np.float32), "shape (N, 1, 24, 24, 24)"),
    (np.zeros((1, 24, 24, 24), np.float32), "shape (N, 1, 24, 24, 24)"),
    (np.zeros((3, *ITEM), np.float32), "limit of 2 cases"),
])
def test_bad_batches_raise_a_short_fixed_message(images, expected):
    with pytest.raises(MlflowException) as info:
        S.validate_batch(images, ITEM, limit=2)
    err = info.value
    assert err.error_code == "INVALID_PARAMETER_VALUE" and err.get_http_status_code() == 400
    assert expected in err.message and len(err.message) < 120
    assert "stack_trace" not in json.loads(err.serialize_as_json())


def test_limits_and_their_environment_variables(monkeypatch):
    monkeypatch.delenv(S.MAX_BATCH_ENV, raising=False)
    monkeypatch.delenv(S.MAX_REQUEST_BYTES_ENV, raising=False)
    assert S.max_batch() == S.MAX_BATCH == 16
    # 16 cases of the 48^3 demo at 32 bytes a value, plus 1 MiB
    assert S.max_request_bytes((1, 48, 48, 48), 16) == 16 * 48**3 * 32 + 2**20 == 57_671_680
    monkeypatch.setenv(S.MAX_BATCH_ENV, "4")
    monkeypatch.setenv(S.MAX_REQUEST_BYTES_ENV, "1000")
    assert S.max_batch() == 4 and S.max_request_bytes((1, 48, 48, 48), 4) == 1000
    for bad in ("0", "-3", "lots"):  # a typo must not lift the limit
        monkeypatch.setenv(S.MAX_BATCH_ENV, bad)
        with pytest.raises(ValueError, match=S.MAX_BATCH_ENV):
            S.max_batch()


def test_error_bodies_lose_the_trace_and_the_echoed_input():
    trace = f'Traceback (most recent call last):\n  File "{Path.home()}/x/site-packages/torch/nn.py"'
    err = MlflowException("Failed to predict data '[[nan nan]]'. \nError: input contains non-finite values",
                          error_code=mlflow.protos.databricks_pb2.BAD_REQUEST, stack_trace=trace)
    S._scrub(err)
    body = json.loads(err.serialize_as_json())
    assert body["message"] == "Failed to predict: input contains non-finite values"
    assert "stack_trace" not in body and "Traceback" not in err.serialize_as_json()
    err = MlflowException.invalid_parameter_value("Invalid input. Ensure that input is a valid JSON formatted "
                                                  "string. Error: 'x'\nInput: \n{\"inputs\": [1, 2")
    S._scrub(err)
    assert err.message == "Invalid input. Ensure that input is a valid JSON formatted string. Error: 'x'"
    schema = "['Tensor('float32', (-1, 1, 24, 24, 24))']"
    err = MlflowException(f"Failed to predict data '[[0. 0.]]'. \nError: Failed to enforce schema of data "
                          f"'[[0. 0.]]' with schema '{schema}'. Error: Shape of input (1, 2) does not match.")
    S._scrub(err)
    assert err.message == (f"Failed to predict: input does not match the model's schema {schema}: "
                           "Shape of input (1, 2) does not match.")
    err = MlflowException("x" * 5000)
    S._scrub(err)
    assert len(err.message) < 1100 and err.message.endswith("[truncated]")


def test_the_registered_model_validates_in_process(served, monkeypatch):
    model = _load(served)
    impl = model.unwrap_python_model()
    assert impl.item_shape == ITEM and impl.max_batch == S.MAX_BATCH
    with pytest.raises(MlflowException, match="non-finite"):
        model.predict(_bad(np.nan).astype(np.float32))
    many = np.zeros((S.MAX_BATCH + 1, *ITEM), np.float32)
    assert model.predict(many).shape == (S.MAX_BATCH + 1, 2)  # in-process (the register stage): no batch limit
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")  # what the scoring server sets
    with pytest.raises(MlflowException, match=f"limit of {S.MAX_BATCH} cases"):
        model.predict(many)


# ---------------------------------------------------------------------- over HTTP: one server for all checks
def _tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """`mlflow models serve` of the champion, batch limit SERVE_BATCH, default request-size limit."""
    log_path = tmp_path_factory.mktemp("serve-limits") / "serve.log"
    with mlflow_serve(CHAMPION, served["uri"], log_path, env_extra={S.MAX_BATCH_ENV: str(SERVE_BATCH)},
                      drop_env=(S.MAX_REQUEST_BYTES_ENV,)) as (base, port, pid):
        yield {"base": base, "port": port, "pid": pid, "log": log_path,
               "limit": S.default_max_request_bytes(ITEM, SERVE_BATCH)}


def _raw_post(server, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(f"{server['base']}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _assert_clean(text: str, served) -> None:
    """No stack trace and nothing of the server's file system in an error body."""
    for leak in ("Traceback", 'File "', "site-packages", ".venv", "mlruns", str(Path.home()), str(served["tmp"]),
                 str(Path(sys.executable).parent), "/tmp/", "/work/"):
        assert leak not in text, (leak, text[:2000])


def test_a_valid_request_is_still_answered(server, served, tiny_ingested):
    from pipeline.io.tensors import load_split

    test = load_split(tiny_ingested, "test")
    images = test.images.numpy()[:SERVE_BATCH]
    status, body = _post(f"{server['base']}/invocations", {"inputs": images.tolist()})
    assert status == 200, body
    expected = [served["evaluated"][c] for c in test.case_ids[:SERVE_BATCH]]
    np.testing.assert_allclose(np.asarray(body["predictions"])[:, 1], expected, atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_a_clean_400(server, served, value):
    x = np.zeros((1, *ITEM))
    x[0, 0, 3, 4, 5] = value
    text = json.dumps({"inputs": x.tolist()})  # Python's json writes the NaN / Infinity tokens
    assert "NaN" in text or "Infinity" in text
    status, raw = _raw_post(server, text.encode())
    assert status == 400, raw
    body = json.loads(raw)
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "non-finite" in body["message"]
    assert set(body) <= {"error_code", "message", "sqlstate", "error_class"}  # no stack_trace field
    assert len(raw) < 1000  # the input is not echoed back
    _assert_clean(raw, served)


def test_nan_strings_and_broken_json_are_clean_400s(server, served):
    for payload in (json.dumps({"inputs": np.full((1, *ITEM), "NaN", dtype=object).tolist()}).encode(),
                    b'{"inputs": [[[[[0.1, NaN, 0.3', b"\xff\xfe not json"):
        status, raw = _raw_post(server, payload)
        assert status == 400, raw
        assert "stack_trace" not in json.loads(raw) and len(raw) < 1000 and "0.3" not in raw
        _assert_clean(raw, served)


def test_a_wrong_shape_names_the_expected_shape_without_the_input(server, served):
    status, raw = _raw_post(server, json.dumps({"inputs": np.full((1, 1, 8, 8, 8), 0.125).tolist()}).encode())
    assert status == 400, raw
    message = json.loads(raw)["message"]
    assert "(-1, 1, 24, 24, 24)" in message and "Shape of input (1, 1, 8, 8, 8)" in message
    assert "0.125" not in raw and len(raw) < 1000
    _assert_clean(raw, served)


def test_a_batch_over_the_limit_is_a_400_naming_the_limit(server, served):
    status, body = _post(f"{server['base']}/invocations", {"inputs": np.zeros((SERVE_BATCH + 1, *ITEM)).tolist()})
    assert status == 400, body
    assert f"limit of {SERVE_BATCH} cases" in body["message"] and "stack_trace" not in body
    _assert_clean(json.dumps(body), served)


def _send(server, total: int, chunked: bool) -> tuple[int, dict, float]:
    """POST `total` bytes of whitespace (generated, never held) as a stream; (status, body, seconds)."""
    def chunks(size=1 << 20):
        sent = 0
        while sent < total:
            n = min(size, total - sent)
            sent += n
            yield b" " * n

    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    headers = {"Content-Type": "application/json"}
    if not chunked:
        headers["Content-Length"] = str(total)
    t0 = time.monotonic()
    try:
        conn.request("POST", "/invocations", body=chunks(), headers=headers, encode_chunked=chunked)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may stop reading; its answer is still waiting
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw), time.monotonic() - t0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_request_limit_is_rejected_without_being_held(server, served, chunked):
    limit = server["limit"]
    assert limit == SERVE_BATCH * 24**3 * 32 + 2**20  # what SERVE_BATCH cases take as JSON, plus 1 MiB
    before = _tree_rss(server["pid"])
    status, body, seconds = _send(server, 64 << 20, chunked)  # 64 MiB, ~27x the limit
    after = _tree_rss(server["pid"])
    assert status == 413, body
    assert body["message"] == f"request body exceeds the limit of {limit} bytes"
    assert seconds < 20
    assert after - before < 32 << 20, (before, after)  # the body was not kept (reading it all: > 64 MiB)
    status, _ = _post(f"{server['base']}/invocations", {"inputs": np.zeros((1, *ITEM)).tolist()})
    assert status == 200  # and the server still answers
