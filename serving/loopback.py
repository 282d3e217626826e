"""Ray Serve's one listening socket that ignores where the cluster lives, pinned to the node's address.

Ray 2.60 starts, in every replica, a gRPC server for calls between deployments on "[::]:0": every interface,
whatever address the node was started on (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` puts every other Ray port on
127.0.0.1, docs: stack-notes §6.1). Each of our deployments calls `bind_replica_server_to_node()` in its
constructor, which runs in the replica's process before that server starts: the server then listens on the
node's own address (loopback on a loopback cluster, the node's IP on a real one, where other nodes' replicas
reach it), never on all of them. tests/test_serving.py lists the app's listening sockets.
"""

from __future__ import annotations

_PATCHED = "_glmops_node_address"


def bind_replica_server_to_node() -> None:
    import ray
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, _PATCHED, False):
        return
    ip = ray.util.get_node_ip_address()
    node = f"[{ip}]" if ":" in ip else ip

    def on_node_address(server, address: str):
        return original(server, address.replace("[::]:", f"{node}:", 1))

    setattr(on_node_address, _PATCHED, True)
    replica.add_port_to_grpc_server = on_node_address
