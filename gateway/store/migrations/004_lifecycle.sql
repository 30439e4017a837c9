-- The lifecycle engine (docs/LIFECYCLE.md): crash history for the restart policy, a pending
-- restart time, and an index for the reconciler's scans.

ALTER TABLE vms
    -- When QEMU died unexpectedly, most recent last; the restart policy counts those within its interval.
    ADD COLUMN crash_times   timestamptz[] NOT NULL DEFAULT '{}',
    -- A crashed VM waiting out the policy's delay is restarted at (or after) this time.
    ADD COLUMN restart_after timestamptz;

CREATE INDEX vms_state_idx ON vms (state) WHERE state <> 'destroyed';

