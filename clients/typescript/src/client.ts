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
import type { ListDeploymentsRequest } from "./generated/stevedore/v1/ListDeploymentsRequest.js";
import type { ListDeploymentsResponse__Output } from "./generated/stevedore/v1/ListDeploymentsResponse.js";
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

export type { ListDeploymentsRequest };
export type ListDeploymentsResponse = ListDeploymentsResponse__Output;

/** A call the server refused or could not answer: `code` is the gRPC status name
 * (e.g. "INVALID_ARGUMENT", "NOT_FOUND"), `message` the server's text. */
export class StevedoreError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = "StevedoreError";
    this.details = message;
  }
  /** The server's text alone. */
  readonly details: string;

  static from(err: unknown): unknown {
    const e = err as Partial<grpc.ServiceError>;
    if (typeof e?.code !== "number") return err;
    return new StevedoreError(grpc.status[e.code] ?? String(e.code), e.details ?? "");
  }
}

export interface Options {
  /** Sent as `authorization: Bearer …`. */
  token?: string;
  /** TLS with the system roots (implied by `ca` or `cert`). */
  tls?: boolean;
  /** PEM of the CA that signed the server's certificate. */
  ca?: Buffer;
  /** PEM client certificate and key, for mTLS. */
  cert?: Buffer;
  key?: Buffer;
}

/** Deployer client: deploy, watch, status, list, cancel. Failing calls reject with
 * (or throw) a StevedoreError. */
export class Stevedore {
  private readonly stub: DeployerClient;
  private readonly metadata: grpc.Metadata;

  constructor(address = "127.0.0.1:50051", options: Options = {}) {
    const Deployer = loadService();
    const credentials =
      options.tls || options.ca || options.cert
        ? grpc.credentials.createSsl(options.ca ?? null, options.key ?? null, options.cert ?? null)
        : grpc.credentials.createInsecure();
    this.stub = new Deployer(address, credentials);
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
        (err: grpc.ServiceError | null, status?: DeploymentStatus) =>
          err || !status ? reject(StevedoreError.from(err)) : resolve(status),
      );
    });
  }

  /** One page of deployments, newest first. */
  list(request: ListDeploymentsRequest = {}): Promise<ListDeploymentsResponse> {
    return new Promise((resolve, reject) => {
      this.stub.ListDeployments(
        request,
        this.metadata,
        (err: grpc.ServiceError | null, page?: ListDeploymentsResponse) =>
          err || !page ? reject(StevedoreError.from(err)) : resolve(page),
      );
    });
  }

  /** Cancels a running deployment; resolves to its status. */
  cancel(deploymentId: string): Promise<DeploymentStatus> {
    return new Promise((resolve, reject) => {
      this.stub.CancelDeployment({ deployment_id: deploymentId }, this.metadata, (err, response) =>
        err || !response?.status ? reject(StevedoreError.from(err)) : resolve(response.status),
      );
    });
  }

  close(): void {
    this.stub.close();
  }

  private async *updates(call: grpc.ClientReadableStream<ProgressUpdate>): AsyncIterable<ProgressUpdate> {
    try {
      for await (const update of call as AsyncIterable<ProgressUpdate>) {
        if (!update.heartbeat) yield update;
      }
    } catch (err) {
      throw StevedoreError.from(err);
    }
  }
}
