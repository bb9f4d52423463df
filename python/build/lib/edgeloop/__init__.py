"""Client for the edgeloop control plane's operator API.

The whole loop a data scientist drives from a notebook: pull a class's dataset, train, read models with their
lineage and promotion decisions, upload a model of one's own with golden vectors from onnxruntime, roll it out
in stages and wait for it, and watch devices, anomalies, drift and the rollout's gates.

    from edgeloop import Client
    cp = Client("https://cp.example:8080", token=open("admin.token").read().strip(), ca="ca.pem")
    ds = cp.dataset("city-air-quality")
    print(ds.report)
"""

from .client import ApiError, Client, Dataset, LoopError

__all__ = ["ApiError", "Client", "Dataset", "LoopError"]
__version__ = "0.1.0"
