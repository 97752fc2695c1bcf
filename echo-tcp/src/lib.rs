//! The tcp transport for echo (being built; see the issue tracker).

use echo_core::{Registry, Result};

/// Registers this crate's schemes in `registry`. Placeholder until the transport lands.
pub fn register(registry: &mut Registry) -> Result<()> {
    let _ = registry;
    Ok(())
}
