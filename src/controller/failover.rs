//! The SiteFailover controller.
pub mod machine;
