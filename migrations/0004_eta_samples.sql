-- What the ETA learns from a deployment besides its phase durations (those are read
-- from its updates): its image download and its build steps. Written when measured
-- (any outcome); the estimator reads those of succeeded deployments. Removed with the
-- deployment by retention.

-- The download of a PULLING phase that fetched something (an image already present
-- records nothing).
CREATE TABLE pull_samples (
    deployment_id TEXT    PRIMARY KEY NOT NULL,
    bytes         INTEGER NOT NULL,               -- bytes downloaded (layers present locally: 0)
    duration_us   INTEGER NOT NULL                -- from the pull request to its last layer
) WITHOUT ROWID;

-- Each step of a build that ran (a skipped build, its commit already built, has none).
CREATE TABLE build_steps (
    deployment_id TEXT    NOT NULL,
    number        INTEGER NOT NULL,               -- 1-based, as in "Step N/M"
    instruction   TEXT    NOT NULL,               -- as the builder printed it
    cached        INTEGER NOT NULL,               -- 1: " ---> Using cache"
    duration_us   INTEGER NOT NULL,
    PRIMARY KEY (deployment_id, number)
) WITHOUT ROWID;
