-- RemoveApp: when an app was last removed. ListApps leaves out an app whose newest
-- deployment is older than its removal; the deployments themselves stay in history.
CREATE TABLE app_removals (
    app        TEXT    PRIMARY KEY NOT NULL,
    removed_ns INTEGER NOT NULL
);
