-- RemoveApp is recorded as an operation of its own in `deployments` (with its log in
-- `updates`): `operation` tells a deploy from a removal, so ListApps' "what runs now",
-- the ETA's history and other deploy-only reads can leave removals out.
ALTER TABLE deployments ADD COLUMN operation TEXT NOT NULL DEFAULT 'deploy';
