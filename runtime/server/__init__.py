"""edgeml.runtime.server: serve artifacts over the Open Inference Protocol (KServe v2).

    from edgeml.runtime.server import ModelServer, ServerConfig
    server = ModelServer(ServerConfig(port=0))
    server.load("model.edgepkg")
    host, port = server.start()      # serves in a background thread
    ...
    server.stop()                    # drains in-flight requests

See docs/serving.md.
"""

from edgeml.runtime.server.app import ModelServer, ServerConfig
from edgeml.runtime.server.repository import LoadedModel

__all__ = ["LoadedModel", "ModelServer", "ServerConfig"]
