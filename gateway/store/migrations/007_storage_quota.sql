-- Storage quota (issue 13; docs/SECURITY.md "Disk and storage"): the bytes a user's files take on disk
-- (overlays with their snapshots, saved memory states), measured, not declared. NULL: STORAGE_QUOTA_GB.
ALTER TABLE users ADD COLUMN quota_storage_gb integer CHECK (quota_storage_gb >= 0);
