-- A criud.db as the previous release (schema user_version 0, commit c0d410f) writes it:
-- made by that release's Store (open, insert_checkpoint x2, insert_restore), then
-- sqlite3's iterdump.  Do not edit: tests/unit/test_store_migrations.py restores from it.
BEGIN TRANSACTION;
CREATE TABLE checkpoints (
    id TEXT PRIMARY KEY,
    name TEXT,
    pid INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    size_bytes INTEGER,
    options TEXT NOT NULL,
    labels TEXT NOT NULL,
    criu_version TEXT,
    stats TEXT,
    manifest TEXT,
    error TEXT,
    owner_uid INTEGER NOT NULL
, external_keys TEXT);
INSERT INTO "checkpoints" VALUES('0123456789abcdef01234567','web',4242,'done',1700000000.0,1700000001.0,12345,'{"leave_running": false}','{"app": "web"}','4.2.1','{"frozen_time": 100}','{"external": ["pipe:[1]"], "tasks": []}',NULL,1000,'["pipe:[1]"]');
INSERT INTO "checkpoints" VALUES('89abcdef0123456789abcdef','db',4343,'done',1700000002.0,1700000003.0,1000,'{}','{}','4.2.1','{}','{"external": [], "tasks": []}',NULL,0,NULL);
CREATE TABLE restores (
    id TEXT PRIMARY KEY,
    checkpoint_id TEXT NOT NULL,
    pid INTEGER,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    exit_code INTEGER,
    exit_signal INTEGER,
    stats TEXT,
    error TEXT,
    owner_uid INTEGER NOT NULL,
    proc_start INTEGER,
    ns_pid INTEGER
);
INSERT INTO "restores" VALUES('fedcba9876543210fedcba98','0123456789abcdef01234567',5000,'exited',1700000010.0,1700000020.0,0,NULL,NULL,NULL,1000,123,5000);
CREATE UNIQUE INDEX checkpoints_name ON checkpoints(name) WHERE name IS NOT NULL;
COMMIT;
