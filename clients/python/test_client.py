"""End-to-end test of the Python client against a running server and a real engine.

STEVEDORE_ADDR names the server (clients/python/test.sh starts one).
"""

import os
import subprocess
import unittest
import urllib.request
import uuid

from stevedore_client import Stevedore, StevedoreError, pb


class DeployTest(unittest.TestCase):
    def setUp(self):
        self.client = Stevedore(os.environ.get("STEVEDORE_ADDR", "127.0.0.1:50051"))
        self.app = f"t-py-{uuid.uuid4().hex[:10]}"

    def tearDown(self):
        self.client.close()
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=io.stevedore.app={self.app}"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=True)

    def test_deploy_streams_to_complete_and_serves(self):
        updates = list(self.client.deploy(self.app, "stevedore-test/web:1", ports=[8080]))
        self.assertEqual([u.sequence for u in updates], list(range(1, len(updates) + 1)))
        totals = [u.total_progress for u in updates]
        self.assertEqual(totals, sorted(totals))
        last = updates[-1]
        self.assertEqual(last.phase, pb.PHASE_COMPLETE)
        self.assertTrue(last.result.success)
        url = last.result.endpoints["8080/tcp"]
        with urllib.request.urlopen(url, timeout=5) as response:
            self.assertEqual(response.read().decode().strip(), "v1")

        status = self.client.status(last.deployment_id)
        self.assertEqual(status.state, pb.DEPLOYMENT_STATE_SUCCEEDED)

        replay = list(self.client.watch(last.deployment_id, after_sequence=3))
        self.assertEqual([u.sequence for u in replay], [u.sequence for u in updates[3:]])

    def test_bad_input_names_the_field(self):
        with self.assertRaises(StevedoreError) as caught:
            list(self.client.deploy("Bad_Name", "stevedore-test/web:1"))
        self.assertEqual(caught.exception.code, "INVALID_ARGUMENT")
        self.assertIn("app:", caught.exception.message)

    def test_errors_name_the_status(self):
        with self.assertRaises(StevedoreError) as caught:
            self.client.status("")
        self.assertEqual(caught.exception.code, "INVALID_ARGUMENT")
        self.assertIn("deployment_id", str(caught.exception))

    def test_list_and_cancel(self):
        # A deployment that holds in HEALTH_CHECK (a line never printed) until cancelled.
        stream = self.client.deploy(
            self.app, "stevedore-test/web:1", ports=[8080],
            health_check=pb.HealthCheck(log=pb.LogHealthCheck(pattern="never-printed-7f3a"), timeout={"seconds": 60}),
        )
        first = next(stream)
        page = self.client.list(app=self.app)
        self.assertEqual([d.deployment_id for d in page.deployments], [first.deployment_id])
        status = self.client.cancel(first.deployment_id)
        self.assertEqual(status.state, pb.DEPLOYMENT_STATE_CANCELLED)
        rest = list(stream)
        self.assertEqual(rest[-1].phase, pb.PHASE_CANCELLED)
        with self.assertRaises(StevedoreError) as caught:
            self.client.cancel(first.deployment_id)
        self.assertEqual(caught.exception.code, "FAILED_PRECONDITION")


if __name__ == "__main__":
    unittest.main()
