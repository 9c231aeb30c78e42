// A small TypeScript client for Stevedore's Deployer service.
//
// The service definition is loaded from proto/stevedore/v1/deployer.proto at runtime
// (@grpc/proto-loader), so the client always speaks the contract in this repository.
// Field names follow the proto (keepCase); enums arrive as their names
// ("PHASE_COMPLETE"); 64-bit integers as strings.

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const PROTO_DIR = join(here, "..", "..", "..", "proto");

export interface PortMapping {
  container_port: number;
  host_port?: number;
  protocol?: "tcp" | "udp" | "";
}

export interface DeployRequest {
  app: string;
  image: string;
  command?: string[];
  env?: Record<string, string>;
  ports?: PortMapping[];
  labels?: Record<string, string>;
  idempotency_key?: string;
  [field: string]: unknown;
}

export interface PullProgress {
  layer_id: string;
  current_bytes: string;
  total_bytes: string;
  image_current_bytes: string;
  image_total_bytes: string;
}

export interface DeploymentResult {
  success: boolean;
  message: string;
  container_id: string;
  image_digest: string;
  endpoints: Record<string, string>;
  diagnostics?: { failed_phase: string; step: string; exit_code?: string; log_tail: string[] } | null;
}

export interface ProgressUpdate {
  deployment_id: string;
  sequence: string;
  app: string;
  phase: string;
  phase_progress: number;
  total_progress: number;
  level: string;
  message: string;
  metadata: Record<string, string>;
  pull?: PullProgress | null;
  result?: DeploymentResult | null;
  heartbeat: boolean;
}

export interface DeploymentStatus {
  deployment_id: string;
  app: string;
  image: string;
  state: string;
  phase: string;
  total_progress: number;
  error: string;
  result?: DeploymentResult | null;
  last_sequence: string;
}

type Stub = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

function loadService(): grpc.ServiceClientConstructor {
  const definition = protoLoader.loadSync("stevedore/v1/deployer.proto", {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition) as unknown as {
    stevedore: { v1: { Deployer: grpc.ServiceClientConstructor } };
  };
  return pkg.stevedore.v1.Deployer;
}

/** Deployer client. `token` is sent as `authorization: Bearer …` when given. */
export class Stevedore {
  private readonly stub: Stub;
  private readonly metadata: grpc.Metadata;

  constructor(address = "127.0.0.1:50051", options: { token?: string } = {}) {
    const Deployer = loadService();
    this.stub = new Deployer(address, grpc.credentials.createInsecure()) as unknown as Stub;
    this.metadata = new grpc.Metadata();
    if (options.token) this.metadata.set("authorization", `Bearer ${options.token}`);
  }

  /** Starts a deployment and yields every update until the terminal one (heartbeats skipped). */
  deploy(request: DeployRequest): AsyncIterable<ProgressUpdate> {
    return this.updates(this.stub.Deploy(request, this.metadata) as grpc.ClientReadableStream<ProgressUpdate>);
  }

  /** Replays updates after `afterSequence`, then follows until the end. */
  watch(deploymentId: string, afterSequence = 0): AsyncIterable<ProgressUpdate> {
    const call = this.stub.WatchDeployment(
      { deployment_id: deploymentId, after_sequence: String(afterSequence) },
      this.metadata,
    ) as grpc.ClientReadableStream<ProgressUpdate>;
    return this.updates(call);
  }

  status(deploymentId: string): Promise<DeploymentStatus> {
    return new Promise((resolve, reject) => {
      this.stub.GetStatus(
        { deployment_id: deploymentId },
        this.metadata,
        (err: grpc.ServiceError | null, status: DeploymentStatus) => (err ? reject(err) : resolve(status)),
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
