BEGIN TRANSACTION;
CREATE TABLE "artifacts" (
    task_id TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    disk TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    files INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    sha256 TEXT,
    report TEXT,
    PRIMARY KEY (task_id, cycle, disk)
);
CREATE TABLE codes (
    token_id TEXT PRIMARY KEY,
    workgroup_id TEXT NOT NULL,
    salt BLOB NOT NULL,
    code_hash BLOB NOT NULL,
    uses INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    expires_epoch REAL NOT NULL,
    revoked_at TEXT
);
INSERT INTO "codes" VALUES('at-3t66lxfizrzw5fvr','wg-y5d6zrn3dkvj',X'EF99486212D12C943070852E2288F283',X'0AE6A2F15A05700EA46A7CB794D74C0A5EB1934BF5A49E4B70F07FECC5188DF1',10,8,'2027-01-15T08:00:00Z','2027-04-15T08:00:00Z',1807776000.0,NULL);
INSERT INTO "codes" VALUES('at-0mgxks0hy6yhv5us','wg-y5d6zrn3dkvj',X'8AD28AD55B60E9D787E0007E437AA046',X'E5AC629BFC406882B514DC2D4BE39FAB8BB52723477D30B60830A63AA86E51B9',10,8,'2027-01-15T08:00:00Z','2027-04-15T08:00:00Z',1807776000.0,NULL);
INSERT INTO "codes" VALUES('at-kg0yijpmmmg3ar84','wg-y5d6zrn3dkvj',X'AA8819F5EFA3992F32E1CC9654A7F7BA',X'3AC28896F0AC890C2A9E521B6384E1A540E4EB2C89598F57DD59FBABD758EF86',10,9,'2027-01-15T08:00:00Z','2027-04-15T08:00:00Z',1807776000.0,NULL);
CREATE TABLE commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    source_id TEXT NOT NULL,
    task_id TEXT,
    type TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    error_code TEXT,
    message TEXT,
    result TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
, applied INTEGER NOT NULL DEFAULT 1);
INSERT INTO "commands" VALUES(1,'c-hls4doeob3wsye3h','s-61k4asi6jjvu2yxv','t-djnoqf9ssr4upyys','start','{"bandwidth_mbps":0,"bandwidth_schedule":null,"checksum":false,"compression":7,"cycle":{"dest":"000001","link_dest":null,"number":1},"mode":"file","paths":["/"],"target":{"fingerprint":"sha256:abababababababababababababababababababababababababababababababab","kind":"rsync","module":"t-djnoqf9ssr4upyys","password":"npC_UpQYc0ywbp0BMN_dLedrjTingGQU","url":"https://10.0.0.1:8443/rsync/v1/tasks/t-djnoqf9ssr4upyys","user":"t-djnoqf9ssr4upyys"},"task_id":"t-djnoqf9ssr4upyys"}','superseded',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(2,'c-7xlywkoa4uk4x43r','s-elvmum8infdad3pz','t-biw57ggme8t6rvzu','start','{"bandwidth_mbps":0,"bandwidth_schedule":null,"checksum":false,"compression":7,"cycle":{"dest":"000001","link_dest":null,"number":1},"mode":"file","paths":["/"],"target":{"fingerprint":"sha256:abababababababababababababababababababababababababababababababab","kind":"rsync","module":"t-biw57ggme8t6rvzu","password":"fYvSnh4zlYjEJPkarEGenak-cbcyGMuA","url":"https://10.0.0.1:8443/rsync/v1/tasks/t-biw57ggme8t6rvzu","user":"t-biw57ggme8t6rvzu"},"task_id":"t-biw57ggme8t6rvzu"}','superseded',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(3,'c-il4vsj5134fiy2w5','s-155r8nipsfz1w7v1','t-r7tozrvc9fj2ekft','start','{"bandwidth_mbps":0,"bandwidth_schedule":null,"checksum":false,"compression":7,"cycle":{"dest":"000001","link_dest":null,"number":1},"mode":"file","paths":["/"],"target":{"fingerprint":"sha256:abababababababababababababababababababababababababababababababab","kind":"rsync","module":"t-r7tozrvc9fj2ekft","password":"IHHr_QGIL8LXwsllWzL5jJcTbbR19G-t","url":"https://10.0.0.1:8443/rsync/v1/tasks/t-r7tozrvc9fj2ekft","user":"t-r7tozrvc9fj2ekft"},"task_id":"t-r7tozrvc9fj2ekft"}','superseded',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(4,'c-ge25kezczjz6qk4n','s-ll804ufc6i3nvnls','t-josofsoz31dvk3x6','start','{"bandwidth_mbps":0,"bandwidth_schedule":null,"checksum":false,"compression":7,"cycle":{"dest":"000001","link_dest":null,"number":1},"mode":"file","paths":["/"],"target":{"fingerprint":"sha256:abababababababababababababababababababababababababababababababab","kind":"rsync","module":"t-josofsoz31dvk3x6","password":"HUoHdKNykhuKaia2aW31szYDO_ebYx0x","url":"https://10.0.0.1:8443/rsync/v1/tasks/t-josofsoz31dvk3x6","user":"t-josofsoz31dvk3x6"},"task_id":"t-josofsoz31dvk3x6"}','superseded',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(5,'c-cmegozuhx1xax130','s-sf84xeczu8hxm9gc','t-qq0u5a5t6evcshqk','start','{"bandwidth_mbps":0,"bandwidth_schedule":null,"checksum":false,"compression":7,"cycle":{"dest":"000001","link_dest":null,"number":1},"mode":"file","paths":["/"],"target":{"fingerprint":"sha256:abababababababababababababababababababababababababababababababab","kind":"rsync","module":"t-qq0u5a5t6evcshqk","password":"R50ch55P_EpIARROpjoWfffmDGkNogB9","url":"https://10.0.0.1:8443/rsync/v1/tasks/t-qq0u5a5t6evcshqk","user":"t-qq0u5a5t6evcshqk"},"task_id":"t-qq0u5a5t6evcshqk"}','superseded',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(6,'c-4bzcc7jbeh8890a2','s-61k4asi6jjvu2yxv','t-djnoqf9ssr4upyys','abort','{"task_id":"t-djnoqf9ssr4upyys"}','accepted',NULL,NULL,'{}','2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(7,'c-n0wfjkbdmjloklfm','s-elvmum8infdad3pz','t-biw57ggme8t6rvzu','abort','{"task_id":"t-biw57ggme8t6rvzu"}','queued',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(8,'c-awll2d0bo4m5cubr','s-155r8nipsfz1w7v1','t-r7tozrvc9fj2ekft','abort','{"task_id":"t-r7tozrvc9fj2ekft"}','queued',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(9,'c-xvgz5bkazvfdbh6o','s-ll804ufc6i3nvnls','t-josofsoz31dvk3x6','abort','{"task_id":"t-josofsoz31dvk3x6"}','queued',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(10,'c-mn2lqy9jqwv1lwci','s-sf84xeczu8hxm9gc','t-qq0u5a5t6evcshqk','abort','{"task_id":"t-qq0u5a5t6evcshqk"}','queued',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(11,'c-s1o7u1ewoj0x8ayg','s-61k4asi6jjvu2yxv','t-os2s21tba05eaq4m','start','{"bandwidth_mbps":0,"bandwidth_schedule":null,"checksum":false,"compression":7,"cycle":{"dest":"000001","link_dest":null,"number":1},"mode":"file","paths":["/"],"target":{"fingerprint":"sha256:abababababababababababababababababababababababababababababababab","kind":"rsync","module":"t-os2s21tba05eaq4m","password":"jJu5mDExZXgCQ7VtlPFj2O5VijB-yezu","url":"https://10.0.0.1:8443/rsync/v1/tasks/t-os2s21tba05eaq4m","user":"t-os2s21tba05eaq4m"},"task_id":"t-os2s21tba05eaq4m"}','accepted',NULL,NULL,'{}','2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
INSERT INTO "commands" VALUES(12,'c-zx2k7o5l1agt7ozn','s-elvmum8infdad3pz','t-33hvy5wh7563kscu','drill','{"mode":"file","paths":["/"],"target":{"fingerprint":"sha256:abababababababababababababababababababababababababababababababab","kind":"rsync","module":"t-33hvy5wh7563kscu","url":"https://10.0.0.1:8443/rsync/v1/tasks/t-33hvy5wh7563kscu"},"task_id":"t-33hvy5wh7563kscu"}','queued',NULL,NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',1);
CREATE TABLE cycle_writers (
    task_id TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    first_at TEXT NOT NULL,
    PRIMARY KEY (task_id, cycle, epoch)
);
CREATE TABLE drills (
    id TEXT PRIMARY KEY,
    source_id TEXT NOT NULL,
    task_id TEXT,
    status TEXT NOT NULL,
    report TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
INSERT INTO "drills" VALUES('c-zx2k7o5l1agt7ozn','s-elvmum8infdad3pz','t-33hvy5wh7563kscu','running',NULL,'2027-01-15T08:00:00Z',NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id TEXT NOT NULL,
    time TEXT NOT NULL,
    level TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL
);
INSERT INTO "events" VALUES(1,'s-61k4asi6jjvu2yxv','2027-01-15T08:00:00Z','info','x','m0');
INSERT INTO "events" VALUES(2,'s-61k4asi6jjvu2yxv','2027-01-15T08:00:00Z','info','x','m1');
INSERT INTO "events" VALUES(3,'s-61k4asi6jjvu2yxv','2027-01-15T08:00:00Z','info','x','m2');
INSERT INTO "events" VALUES(4,'s-61k4asi6jjvu2yxv','2027-01-15T08:00:00Z','info','x','m3');
INSERT INTO "events" VALUES(5,'s-61k4asi6jjvu2yxv','2027-01-15T08:00:00Z','info','x','m4');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','6');
CREATE TABLE sources (
    id TEXT PRIMARY KEY,
    workgroup_id TEXT,
    public_key TEXT NOT NULL,
    hostname TEXT NOT NULL DEFAULT '',
    machine_id TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    inventory TEXT NOT NULL DEFAULT '{}',
    token_id TEXT,
    imported_at TEXT NOT NULL,
    imported_epoch REAL NOT NULL,
    last_seen_epoch REAL,
    last_seen_at TEXT,
    heartbeat TEXT,
    state TEXT NOT NULL DEFAULT 'active',
    replaced_by TEXT
, lease TEXT, lease_epoch INTEGER NOT NULL DEFAULT 0, clone_warning TEXT);
INSERT INTO "sources" VALUES('s-61k4asi6jjvu2yxv','wg-y5d6zrn3dkvj','pI+/Vebqa2lapzqSHvrrcM71+kaGe//N7qIVcITMSj8=','h0','m0','0.1.0','{"hostname":"h0","machine_id":"m0","mounts":[{"device":"/dev/vda1","fstype":"ext4","mountpoint":"/"}],"os":{"family":"linux"}}','at-3t66lxfizrzw5fvr','2027-01-15T08:00:00Z',1800000000.0,NULL,NULL,NULL,'active',NULL,NULL,0,NULL);
INSERT INTO "sources" VALUES('s-elvmum8infdad3pz','wg-y5d6zrn3dkvj','TMqTVMdbcn1a6YtrnJcC7bdvB/+wEX2pnHa/a2ninyE=','h1','m1','0.1.0','{"hostname":"h1","machine_id":"m1","mounts":[{"device":"/dev/vda1","fstype":"ext4","mountpoint":"/"}],"os":{"family":"linux"}}','at-0mgxks0hy6yhv5us','2027-01-15T08:00:00Z',1800000000.0,NULL,NULL,NULL,'active',NULL,NULL,0,NULL);
INSERT INTO "sources" VALUES('s-155r8nipsfz1w7v1','wg-y5d6zrn3dkvj','lm1UT8u00b+VHTJajtZAzjpy9Dys4IMz1YNdh7yEjD0=','h2','m2','0.1.0','{"hostname":"h2","machine_id":"m2","mounts":[{"device":"/dev/vda1","fstype":"ext4","mountpoint":"/"}],"os":{"family":"linux"}}','at-kg0yijpmmmg3ar84','2027-01-15T08:00:00Z',1800000000.0,NULL,NULL,NULL,'active',NULL,NULL,0,NULL);
INSERT INTO "sources" VALUES('s-ll804ufc6i3nvnls','wg-y5d6zrn3dkvj','Xh+Xp3wBKLH5wAmXOmtp4KB1/pALsSDoCtv66Ad04R4=','h3','m3','0.1.0','{"hostname":"h3","machine_id":"m3","mounts":[{"device":"/dev/vda1","fstype":"ext4","mountpoint":"/"}],"os":{"family":"linux"}}','at-3t66lxfizrzw5fvr','2027-01-15T08:00:00Z',1800000000.0,NULL,NULL,NULL,'active',NULL,NULL,0,NULL);
INSERT INTO "sources" VALUES('s-sf84xeczu8hxm9gc','wg-y5d6zrn3dkvj','9FBpyKQPxxJP3bjA4eg2kAPkn+N3s6x3p9EQyivzBow=','h4','m4','0.1.0','{"hostname":"h4","machine_id":"m4","mounts":[{"device":"/dev/vda1","fstype":"ext4","mountpoint":"/"}],"os":{"family":"linux"}}','at-0mgxks0hy6yhv5us','2027-01-15T08:00:00Z',1800000000.0,NULL,NULL,NULL,'active',NULL,NULL,0,NULL);
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    source_id TEXT NOT NULL,
    workgroup_id TEXT,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT 'file',
    paths TEXT NOT NULL,
    bandwidth_mbps INTEGER NOT NULL,
    compression INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    sync_every_s INTEGER,
    keep_images INTEGER NOT NULL,
    status TEXT NOT NULL,
    paused_from TEXT,
    finalizing INTEGER NOT NULL DEFAULT 0,
    current_cycle INTEGER,
    last_committed INTEGER,
    rsync_password TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    finished_at TEXT
, disks TEXT NOT NULL DEFAULT '[]', snapshot TEXT, block_token TEXT, drill_command TEXT, drill_override TEXT, history TEXT NOT NULL DEFAULT '[]', bandwidth_schedule TEXT);
INSERT INTO "tasks" VALUES('t-djnoqf9ssr4upyys','s-61k4asi6jjvu2yxv','wg-y5d6zrn3dkvj','web-tier-h0','','file','["/"]',0,7,0,NULL,3,'cancelled',NULL,0,NULL,NULL,'npC_UpQYc0ywbp0BMN_dLedrjTingGQU',NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','[]',NULL,NULL,NULL,NULL,'[{"at":"2027-01-15T08:00:00Z","status":"syncing"},{"at":"2027-01-15T08:00:00Z","status":"cancelled"}]',NULL);
INSERT INTO "tasks" VALUES('t-biw57ggme8t6rvzu','s-elvmum8infdad3pz','wg-y5d6zrn3dkvj','web-tier-h1','','file','["/"]',0,7,0,NULL,3,'cancelled',NULL,0,NULL,NULL,'fYvSnh4zlYjEJPkarEGenak-cbcyGMuA',NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','[]',NULL,NULL,NULL,NULL,'[{"at":"2027-01-15T08:00:00Z","status":"syncing"},{"at":"2027-01-15T08:00:00Z","status":"cancelled"}]',NULL);
INSERT INTO "tasks" VALUES('t-r7tozrvc9fj2ekft','s-155r8nipsfz1w7v1','wg-y5d6zrn3dkvj','web-tier-h2','','file','["/"]',0,7,0,NULL,3,'cancelled',NULL,0,NULL,NULL,'IHHr_QGIL8LXwsllWzL5jJcTbbR19G-t',NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','[]',NULL,NULL,NULL,NULL,'[{"at":"2027-01-15T08:00:00Z","status":"syncing"},{"at":"2027-01-15T08:00:00Z","status":"cancelled"}]',NULL);
INSERT INTO "tasks" VALUES('t-josofsoz31dvk3x6','s-ll804ufc6i3nvnls','wg-y5d6zrn3dkvj','web-tier-h3','','file','["/"]',0,7,0,NULL,3,'cancelled',NULL,0,NULL,NULL,'HUoHdKNykhuKaia2aW31szYDO_ebYx0x',NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','[]',NULL,NULL,NULL,NULL,'[{"at":"2027-01-15T08:00:00Z","status":"syncing"},{"at":"2027-01-15T08:00:00Z","status":"cancelled"}]',NULL);
INSERT INTO "tasks" VALUES('t-qq0u5a5t6evcshqk','s-sf84xeczu8hxm9gc','wg-y5d6zrn3dkvj','web-tier-h4','','file','["/"]',0,7,0,NULL,3,'cancelled',NULL,0,NULL,NULL,'R50ch55P_EpIARROpjoWfffmDGkNogB9',NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','2027-01-15T08:00:00Z','[]',NULL,NULL,NULL,NULL,'[{"at":"2027-01-15T08:00:00Z","status":"syncing"},{"at":"2027-01-15T08:00:00Z","status":"cancelled"}]',NULL);
INSERT INTO "tasks" VALUES('t-os2s21tba05eaq4m','s-61k4asi6jjvu2yxv','wg-y5d6zrn3dkvj','web-tier-h0','','file','["/"]',0,7,0,NULL,3,'syncing',NULL,0,1,NULL,'jJu5mDExZXgCQ7VtlPFj2O5VijB-yezu',NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',NULL,'[]',NULL,NULL,NULL,NULL,'[{"at":"2027-01-15T08:00:00Z","status":"syncing"}]',NULL);
INSERT INTO "tasks" VALUES('t-33hvy5wh7563kscu','s-elvmum8infdad3pz','wg-y5d6zrn3dkvj','web-tier-h1','','file','["/"]',0,7,0,NULL,3,'drilling',NULL,0,1,NULL,'yjaj3kUrVcPigJBBdV9DpVTjSFq0c2XR',NULL,NULL,'2027-01-15T08:00:00Z','2027-01-15T08:00:00Z',NULL,'[]',NULL,NULL,'c-zx2k7o5l1agt7ozn',NULL,'[{"at":"2027-01-15T08:00:00Z","status":"drilling"}]',NULL);
CREATE TABLE workgroups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
INSERT INTO "workgroups" VALUES('wg-y5d6zrn3dkvj','web-tier','','{}','2027-01-15T08:00:00Z');
INSERT INTO "workgroups" VALUES('wg-82ncv7nbr7tg','db-tier','','{}','2027-01-15T08:00:00Z');
CREATE INDEX codes_wg ON codes (workgroup_id);
CREATE INDEX sources_wg ON sources (workgroup_id);
CREATE INDEX tasks_source ON tasks (source_id);
CREATE INDEX commands_source ON commands (source_id, status);
CREATE INDEX events_source ON events (source_id, id);
CREATE INDEX drills_source ON drills (source_id, created_at)
;
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('commands',12);
INSERT INTO "sqlite_sequence" VALUES('events',5);
COMMIT;
