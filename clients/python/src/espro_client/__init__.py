"""espro-client: predictions with calibrated uncertainty from an espro server.

>>> from espro_client import Client
>>> with Client("http://127.0.0.1:8000") as client:
...     prediction = client.predict("mnist1d", x)
"""

from espro_client.client import AsyncClient, Client, Protocol
from espro_client.errors import (
    BadRequest,
    EsproError,
    NotFound,
    Timeout,
    TLSError,
    Unauthorized,
    Unavailable,
)
from espro_client.result import Model, ModelMetadata, ModelVersion, Prediction, TensorSpec
from espro_client.retry import Retry

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "EsproError",
    "Model",
    "ModelMetadata",
    "ModelVersion",
    "NotFound",
    "Prediction",
    "Protocol",
    "Retry",
    "TLSError",
    "TensorSpec",
    "Timeout",
    "Unauthorized",
    "Unavailable",
]
