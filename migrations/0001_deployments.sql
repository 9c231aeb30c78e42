-- Deployments and their event logs.
--
-- A deployment row holds the request with its secrets removed (env keys only, never
-- values; never registry credentials), the status as JSON, and the columns that list,
-- filters, idempotency and retention query.
CREATE TABLE deployments (
    id              TEXT    PRIMARY KEY NOT NULL,   -- UUID, hyphenated lowercase
    app             TEXT    NOT NULL,
    state           TEXT    NOT NULL,               -- pending, running, succeeded, failed, cancelled
    created_ns      INTEGER NOT NULL,               -- Unix time, nanoseconds
    finished_ns     INTEGER,
    last_sequence   INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    request         TEXT    NOT NULL,               -- JSON, secrets removed
    status          TEXT    NOT NULL                -- JSON of the domain DeploymentStatus
);

CREATE INDEX deployments_newest ON deployments (created_ns DESC, id DESC);
CREATE INDEX deployments_app_newest ON deployments (app, created_ns DESC, id DESC);
CREATE INDEX deployments_unfinished ON deployments (state) WHERE state IN ('pending', 'running');
CREATE UNIQUE INDEX deployments_idempotency ON deployments (app, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Every update of every deployment, in sequence order (1, 2, 3 … per deployment).
CREATE TABLE updates (
    deployment_id TEXT    NOT NULL,
    sequence      INTEGER NOT NULL,
    body          TEXT    NOT NULL,                 -- JSON of the domain Update
    PRIMARY KEY (deployment_id, sequence)
) WITHOUT ROWID;
