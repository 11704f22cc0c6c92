//! The StorageLUN controller.

pub mod failover;
pub mod replicas;
