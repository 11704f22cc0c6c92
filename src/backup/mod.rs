//! Off-site backups of a LUN's snapshots to S3-compatible object storage with restic ([`restic`]):
//! encrypted with the repository password, kept by count and by age, restorable one mailbox at a time or
//! for the whole LUN into a directory that the restore import ([`crate::restore::import`]) reads as it
//! reads a snapshot clone.

pub mod restic;
