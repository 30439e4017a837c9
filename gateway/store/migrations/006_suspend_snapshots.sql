-- Idle suspend and user snapshots (issue 7; docs/LIFECYCLE.md "Suspend and resume", docs/SNAPSHOTS.md).
--
-- A suspended VM's memory is saved to <vm_id>.state beside its overlay and QEMU is gone; resuming
-- restores it (-incoming). A user's snapshot is a qcow2 internal snapshot of the overlay (disk, and
-- memory when the VM was running), named s-<snapshot id>.

ALTER TABLE vms DROP CONSTRAINT vms_state_check;
ALTER TABLE vms ADD CONSTRAINT vms_state_check CHECK (state IN (
    'requested', 'provisioning', 'starting', 'running', 'stopping', 'stopped', 'destroying', 'destroyed', 'error',
    'suspending', 'suspended', 'resuming', 'restoring'));
ALTER TABLE vms DROP CONSTRAINT vms_desired_state_check;
ALTER TABLE vms ADD CONSTRAINT vms_desired_state_check CHECK (
    desired_state IN ('running', 'stopped', 'destroyed', 'suspended'));

ALTER TABLE vms
    -- Set while the VM's memory lives in its state file (suspended, or on its way back).
    ADD COLUMN suspended_at     timestamptz,
    -- The snapshot a VM in state restoring goes back to.
    ADD COLUMN restore_snapshot uuid;

CREATE TABLE snapshots (
    id           uuid PRIMARY KEY,
    vm_id        uuid NOT NULL REFERENCES vms (id),
    user_id      uuid NOT NULL REFERENCES users (id),
    name         text NOT NULL,
    -- creating -> ready -> deleting -> deleted; creating -> error (nothing of it is left).
    state        text NOT NULL CHECK (state IN ('creating', 'ready', 'deleting', 'deleted', 'error')),
    has_memory   boolean,
    -- Bytes of saved memory (qemu-img's vm-state-size); the disk's part is shared copy-on-write clusters.
    memory_bytes bigint,
    error_reason text,
    -- Why it went: the user, retention (keep N, max age), or the VM's destruction.
    deleted_by   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    ready_at     timestamptz,
    deleted_at   timestamptz
);
-- Names are unique among a VM's snapshots that exist (or are on their way).
CREATE UNIQUE INDEX snapshots_vm_name_idx ON snapshots (vm_id, name) WHERE state IN ('creating', 'ready', 'deleting');
CREATE INDEX snapshots_live_idx ON snapshots (vm_id, created_at) WHERE state IN ('creating', 'ready', 'deleting');
CREATE INDEX snapshots_user_idx ON snapshots (user_id) WHERE state IN ('creating', 'ready');
