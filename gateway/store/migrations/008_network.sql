-- VM networks (issue 15; docs/NETWORK.md): outbound (NAT to the internet through the VM's own network
-- namespace) or none. VMs made before have none: their jobs carry no NIC.
ALTER TABLE vms ADD COLUMN network text NOT NULL DEFAULT 'none' CHECK (network IN ('none', 'outbound'));
