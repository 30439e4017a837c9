-- Users, VMs, their state history, and the audit log.

CREATE TABLE users (
    id                uuid PRIMARY KEY,
    email             text NOT NULL,
    password_hash     text NOT NULL,
    role              text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    is_active         boolean NOT NULL DEFAULT true,
    email_verified_at timestamptz,
    -- NULL means "the configured default".
    quota_max_vms     integer CHECK (quota_max_vms >= 0),
    quota_vcpus       integer CHECK (quota_vcpus >= 0),
    quota_memory_mb   integer CHECK (quota_memory_mb >= 0),
    quota_disk_gb     integer CHECK (quota_disk_gb >= 0),
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

CREATE TABLE vms (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id),
    name          text NOT NULL,
    template      text NOT NULL,
    cpu           integer NOT NULL CHECK (cpu > 0),
    memory_mb     integer NOT NULL CHECK (memory_mb > 0),
    disk_gb       integer NOT NULL CHECK (disk_gb > 0),
    userdata      text,
    state         text NOT NULL CHECK (state IN ('requested', 'provisioning', 'starting', 'running', 'stopping',
                                                 'stopped', 'destroying', 'destroyed', 'error')),
    desired_state text NOT NULL CHECK (desired_state IN ('running', 'stopped', 'destroyed')),
    error_reason  text,
    overlay_path  text,
    jobspec       jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    stopped_at    timestamptz,
    destroyed_at  timestamptz
);
CREATE INDEX vms_user_live_idx ON vms (user_id) WHERE state <> 'destroyed';

CREATE TABLE vm_events (
    id         bigserial PRIMARY KEY,
    vm_id      uuid NOT NULL REFERENCES vms (id),
    from_state text,
    to_state   text NOT NULL,
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vm_events_vm_idx ON vm_events (vm_id, id);

CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    user_id    uuid,
    ip         text,
    action     text NOT NULL,
    vm_id      uuid,
    outcome    text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_user_idx ON audit_log (user_id, id);
