"""Overload: past its bounded queue the server sheds load with 503s, loses no request, and
answers every admitted one correctly.

The app is redeployed with a small bounded queue (Serve's ``max_ongoing_requests`` and
``max_queued_requests``), no batching, and a ``gated`` model whose engine the test holds
(:class:`helpers.Gate`), so what is admitted does not depend on how fast the machine is. How
long admitted requests wait under a sustained overload is measured by
``benchmarks/overload.py``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import torch

from helpers import FP32_ATOL, Gate, wait_until
from serving.bundle import load_bundle
from serving.predictor import Predictor

ONGOING, QUEUED = 2, 4
"""The bounded queue under test: requests a replica holds, requests the proxy queues."""
BURST = 64
"""Requests sent at once at a held engine."""
SLACK = ONGOING + QUEUED
"""Requests Serve's router may admit past its bounds: one it is still assigning to a replica
is not counted as queued (seen: up to 2)."""
LOAD, CLIENTS = 256, 32
"""Requests sent by as many client threads as fast as they are answered."""
X = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)


def post(client: httpx.Client, url: str) -> httpx.Response | str:
    """The answer, or the name of the exception when there was none."""
    try:
        return client.post(url, json={"inputs": X.tolist()})
    except httpx.HTTPError as err:
        return type(err).__name__


def check(answers: list[httpx.Response | str], expected: np.ndarray) -> tuple[int, int]:
    """Every request was answered, 200 with the right probabilities or 503 with Retry-After
    and a one-line reason; the numbers of each."""
    lost = [a for a in answers if isinstance(a, str)]
    assert lost == [], f"requests without an answer: {lost}"
    statuses = [a.status_code for a in answers if not isinstance(a, str)]
    assert set(statuses) <= {200, 503}, statuses
    for answer in answers:
        assert not isinstance(answer, str)
        if answer.status_code == 200:
            got = answer.json()["predictions"][0]["probabilities"]
            np.testing.assert_allclose(got, expected, atol=FP32_ATOL)
        else:
            assert answer.headers["retry-after"] == "1"
            assert answer.text.strip() and "\n" not in answer.text.strip(), answer.text
    return statuses.count(200), statuses.count(503)


def test_overload_is_shed_with_503_and_no_request_is_lost(server: Any, tmp_path: Any) -> None:
    gate = Gate(tmp_path / "gate")
    bundle = gate.bundle(tmp_path / "gated")
    predictor = Predictor(load_bundle(bundle), allow_custom_architecture=True)
    expected = predictor.predict(torch.from_numpy(X)).probs[0].numpy()
    url = f"{server.http}/v1/models/gated/predict"
    server.redeploy(
        bundles=[*server.config.bundles, str(bundle)],
        max_batch_size=1,
        batch_wait_timeout_s=0.0,
        max_ongoing_requests=ONGOING,
        max_queued_requests=QUEUED,
    )
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    try:
        with httpx.Client(timeout=60, limits=limits) as client:
            # A burst at a held engine: it holds 1 request, the replica 1 more (ONGOING), the
            # proxy QUEUED; the others are refused at once, but for Serve's SLACK.
            gate.close()
            entered = len(gate.batches())
            with ThreadPoolExecutor(BURST) as pool:
                first = pool.submit(post, client, url)
                wait_until(lambda: len(gate.batches()) > entered, "a request to hold the engine")
                rest = [pool.submit(post, client, url) for _ in range(BURST - 1)]
                refused = BURST - ONGOING - QUEUED - SLACK
                wait_until(lambda: sum(f.done() for f in rest) >= refused, f"{refused} refusals")
                gate.open()
                burst = [first.result()] + [f.result() for f in rest]
            # Then load from more clients than the queue holds, the engine running freely.
            with ThreadPoolExecutor(CLIENTS) as pool:
                load = list(pool.map(lambda _: post(client, url), range(LOAD)))
    finally:
        gate.open()
        server.redeploy()

    admitted, shed = check(burst, expected)
    assert admitted >= ONGOING + QUEUED and shed >= BURST - ONGOING - QUEUED - SLACK, shed
    admitted, shed = check(load, expected)
    assert admitted + shed == LOAD and admitted > 0, (admitted, shed)
    # After the overload (and the redeploy back) the server answers normally.
    answer = httpx.post(f"{server.http}/v1/models/tiny/predict", json={"inputs": X.tolist()})
    assert answer.status_code == 200, answer.text
