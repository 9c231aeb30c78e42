"""A small Python client for Stevedore's Deployer service.

Run ./generate.sh first: it generates the gRPC code from proto/ into gen/.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

import grpc  # noqa: E402
from stevedore.v1 import deployer_pb2 as pb  # noqa: E402,F401
from stevedore.v1 import deployer_pb2_grpc as pb_grpc  # noqa: E402


class StevedoreError(Exception):
    """A call the server refused or could not answer: `code` is the gRPC status name
    (e.g. "INVALID_ARGUMENT", "NOT_FOUND"), `message` the server's text."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, e):
        return cls(e.code().name, e.details() or "")


def _unary(call):
    try:
        return call()
    except grpc.RpcError as e:
        raise StevedoreError.from_rpc(e) from None


def _stream(call):
    try:
        yield from call()
    except grpc.RpcError as e:
        raise StevedoreError.from_rpc(e) from None


class Stevedore:
    """Deployer client: deploy, watch, status, list, cancel.

    `token` is sent as `authorization: Bearer ...` when given. TLS: pass `ca` (PEM
    bytes or a path) to verify the server, plus `cert` and `key` for mTLS; without
    `ca`, `tls=True` uses the system roots. Failing calls raise StevedoreError.
    """

    def __init__(self, address="127.0.0.1:50051", token=None, tls=False, ca=None, cert=None, key=None):
        if tls or ca or cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(ca), private_key=_pem(key), certificate_chain=_pem(cert)
            )
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.DeployerStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def deploy(self, app, image, ports=(), env=None, **fields):
        """Starts a deployment; yields every ProgressUpdate until the terminal one."""
        request = pb.DeployRequest(
            app=app,
            image=image,
            ports=[pb.PortMapping(container_port=p) for p in ports],
            env=env or {},
            **fields,
        )
        yield from _stream(lambda: self.stub.Deploy(request, metadata=self.metadata))

    def watch(self, deployment_id, after_sequence=0):
        """Replays updates after `after_sequence`, then follows until the end."""
        request = pb.WatchRequest(deployment_id=deployment_id, after_sequence=after_sequence)
        yield from _stream(lambda: self.stub.WatchDeployment(request, metadata=self.metadata))

    def status(self, deployment_id):
        request = pb.GetStatusRequest(deployment_id=deployment_id)
        return _unary(lambda: self.stub.GetStatus(request, metadata=self.metadata))

    def list(self, app="", state=0, page_size=0, page_token=""):
        """One page of deployments, newest first (a ListDeploymentsResponse)."""
        request = pb.ListDeploymentsRequest(app=app, state=state, page_size=page_size, page_token=page_token)
        return _unary(lambda: self.stub.ListDeployments(request, metadata=self.metadata))

    def cancel(self, deployment_id):
        """Cancels a running deployment; returns its DeploymentStatus."""
        request = pb.CancelRequest(deployment_id=deployment_id)
        return _unary(lambda: self.stub.CancelDeployment(request, metadata=self.metadata)).status

    def close(self):
        self.channel.close()


def _pem(value):
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def phase_name(update):
    return pb.Phase.Name(update.phase).removeprefix("PHASE_")
