//! The relay that new connections and new requests get. A reload builds a
//! whole new [`Relay`] and puts it here; connections already open keep the
//! TLS session and leaf they were accepted with, and each of their later
//! requests is checked against the relay that is live when it arrives.

use std::sync::{Arc, RwLock};

use super::Relay;

pub struct LiveRelay {
    current: RwLock<Arc<Relay>>,
}

impl LiveRelay {
    pub fn new(relay: Arc<Relay>) -> Arc<LiveRelay> {
        Arc::new(LiveRelay {
            current: RwLock::new(relay),
        })
    }

    /// The relay live now.
    pub fn get(&self) -> Arc<Relay> {
        // A poisoned lock still holds a whole Arc: writers only swap it.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `relay` the live one; returns the one it replaced.
    pub fn replace(&self, relay: Arc<Relay>) -> Arc<Relay> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, relay)
    }
}
