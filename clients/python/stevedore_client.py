"""A small Python client for Stevedore's Deployer service.

Run ./generate.sh first: it generates the gRPC code from proto/ into gen/.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

import grpc  # noqa: E402
from stevedore.v1 import deployer_pb2 as pb  # noqa: E402,F401
from stevedore.v1 import deployer_pb2_grpc as pb_grpc  # noqa: E402


class Stevedore:
    """Deployer client. `token` is sent as `authorization: Bearer …` when given."""

    def __init__(self, address="127.0.0.1:50051", token=None):
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
        yield from self.stub.Deploy(request, metadata=self.metadata)

    def watch(self, deployment_id, after_sequence=0):
        """Replays updates after `after_sequence`, then follows until the end."""
        request = pb.WatchRequest(deployment_id=deployment_id, after_sequence=after_sequence)
        yield from self.stub.WatchDeployment(request, metadata=self.metadata)

    def status(self, deployment_id):
        return self.stub.GetStatus(pb.GetStatusRequest(deployment_id=deployment_id), metadata=self.metadata)

    def close(self):
        self.channel.close()


def phase_name(update):
    return pb.Phase.Name(update.phase).removeprefix("PHASE_")
