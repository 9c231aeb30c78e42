// A small TypeScript client for Stevedore's Deployer service.
//
// The service definition is loaded from proto/stevedore/v1/deployer.proto at runtime
// (@grpc/proto-loader), so the client always speaks the contract in this repository.
// The message types in src/generated/ are generated from the same proto by
// proto-loader-gen-types (`npm run generate`, run by test.sh), never copied by hand.
// Field names follow the proto (keepCase); enums arrive as their names
// ("PHASE_COMPLETE"); 64-bit integers as strings.

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { ProtoGrpcType } from "./generated/deployer.js";
import type { DeployerClient } from "./generated/stevedore/v1/Deployer.js";
import type { DeployRequest } from "./generated/stevedore/v1/DeployRequest.js";
import type { DeploymentStatus__Output } from "./generated/stevedore/v1/DeploymentStatus.js";
import type { ProgressUpdate__Output } from "./generated/stevedore/v1/ProgressUpdate.js";

export type { DeployRequest };
/** An update as the client receives it (every field present). */
export type ProgressUpdate = ProgressUpdate__Output;
export type DeploymentStatus = DeploymentStatus__Output;
export type { DeploymentResult__Output as DeploymentResult } from "./generated/stevedore/v1/DeploymentResult.js";
export type { PullProgress__Output as PullProgress } from "./generated/stevedore/v1/PullProgress.js";
export type { PortMapping } from "./generated/stevedore/v1/PortMapping.js";

const here = dirname(fileURLToPath(import.meta.url));
export const PROTO_DIR = join(here, "..", "..", "..", "proto");

/** The options the generated types assume (see the generate script in package.json). */
const LOAD_OPTIONS: protoLoader.Options = {
  includeDirs: [PROTO_DIR],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

function loadService(): ProtoGrpcType["stevedore"]["v1"]["Deployer"] {
  const definition = protoLoader.loadSync("stevedore/v1/deployer.proto", LOAD_OPTIONS);
  const pkg = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;
  return pkg.stevedore.v1.Deployer;
}

/** Deployer client. `token` is sent as `authorization: Bearer …` when given. */
export class Stevedore {
  private readonly stub: DeployerClient;
  private readonly metadata: grpc.Metadata;

  constructor(address = "127.0.0.1:50051", options: { token?: string } = {}) {
    const Deployer = loadService();
    this.stub = new Deployer(address, grpc.credentials.createInsecure());
    this.metadata = new grpc.Metadata();
    if (options.token) this.metadata.set("authorization", `Bearer ${options.token}`);
  }

  /** Starts a deployment and yields every update until the terminal one (heartbeats skipped). */
  deploy(request: DeployRequest): AsyncIterable<ProgressUpdate> {
    return this.updates(this.stub.Deploy(request, this.metadata));
  }

  /** Replays updates after `afterSequence`, then follows until the end. */
  watch(deploymentId: string, afterSequence = 0): AsyncIterable<ProgressUpdate> {
    const call = this.stub.WatchDeployment(
      { deployment_id: deploymentId, after_sequence: String(afterSequence) },
      this.metadata,
    );
    return this.updates(call);
  }

  status(deploymentId: string): Promise<DeploymentStatus> {
    return new Promise((resolve, reject) => {
      this.stub.GetStatus(
        { deployment_id: deploymentId },
        this.metadata,
        (err: grpc.ServiceError | null, status?: DeploymentStatus) => (err || !status ? reject(err) : resolve(status)),
      );
    });
  }

  close(): void {
    this.stub.close();
  }

  private async *updates(call: grpc.ClientReadableStream<ProgressUpdate>): AsyncIterable<ProgressUpdate> {
    for await (const update of call as AsyncIterable<ProgressUpdate>) {
      if (!update.heartbeat) yield update;
    }
  }
}
