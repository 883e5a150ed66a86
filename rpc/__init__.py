"""JSON-RPC for NeuroSeed: the server (aiohttp in its own thread), the trio bridge and the SDK.

The SDK is what wallets, scripts and the CLI use::

    from rpc import Client
    with Client("http://127.0.0.1:8645/") as c:
        print(c.block_number())
"""

from rpc.client import AsyncClient, Client
from rpc.errors import ClientError, ReceiptTimeout, RequestTimeout, RpcError, TransportError

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ReceiptTimeout",
    "RequestTimeout",
    "RpcError",
    "TransportError",
]
