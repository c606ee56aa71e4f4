//! Default locations on disk.

/// Where the sidecar keeps its CA and other state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/proxypilot";
