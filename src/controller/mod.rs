//! Reconcilers.

pub mod lun;
