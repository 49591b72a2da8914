//! `MsiRoutes`: the WHP VM's GSI-to-MSI table, the counterpart of KVM's GSI routing. Routes are
//! replaced as a whole (`MsiRouting::set_msi_routes`), each message is decoded once into the
//! `InterruptRequest` it delivers, and a device that signals a GSI gets that request back (or
//! nothing, for an unrouted GSI or a message no local APIC would accept, as KVM drops it).
//!
//! Platform-neutral; unit-tested on Linux.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use devices::irqchip::InterruptRequest;

use crate::hypervisor::{MsiRoute, FIRST_MSI_GSI};

/// A refused route table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsiRouteError {
    /// A route names a GSI of the platform's interrupt pins.
    #[error(
        "MSI route on GSI {0}: GSIs below {FIRST_MSI_GSI} are the interrupt controller's pins"
    )]
    PlatformGsi(u32),
}

/// The GSI-to-MSI table of one VM.
#[derive(Debug, Default)]
pub struct MsiRoutes {
    routes: RwLock<HashMap<u32, Option<InterruptRequest>>>,
}

impl MsiRoutes {
    /// Replaces every route; on error the table is left as it was.
    pub fn set(&self, routes: &[MsiRoute]) -> Result<(), MsiRouteError> {
        let mut table = HashMap::with_capacity(routes.len());
        for r in routes {
            if r.gsi < FIRST_MSI_GSI {
                return Err(MsiRouteError::PlatformGsi(r.gsi));
            }
            table.insert(r.gsi, InterruptRequest::from_msi(r.address, r.data));
        }
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = table;
        Ok(())
    }

    /// What signalling `gsi` delivers, if anything.
    pub fn request(&self, gsi: u32) -> Option<InterruptRequest> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&gsi)
            .copied()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::irqchip::DeliveryMode;

    fn route(gsi: u32, address: u64, data: u32) -> MsiRoute {
        MsiRoute { gsi, address, data }
    }

    #[test]
    fn a_routed_gsi_delivers_its_decoded_message_until_the_table_is_replaced() {
        let t = MsiRoutes::default();
        t.set(&[route(24, 0xfee0_1000, 0x41), route(25, 0xfee0_0000, 0x42)])
            .unwrap();
        let r = t.request(24).unwrap();
        assert_eq!((r.destination, r.vector), (1, 0x41));
        assert_eq!(r.delivery_mode, DeliveryMode::Fixed);
        assert_eq!(t.request(26), None);
        t.set(&[route(26, 0xfee0_0000, 0x43)]).unwrap();
        assert_eq!(t.request(24), None);
        assert_eq!(t.request(26).unwrap().vector, 0x43);
    }

    #[test]
    fn a_message_outside_the_msi_window_delivers_nothing() {
        let t = MsiRoutes::default();
        t.set(&[route(30, 0xdead_0000, 0x41)]).unwrap();
        assert_eq!(t.request(30), None);
    }

    #[test]
    fn a_route_on_a_pin_gsi_is_refused_and_the_table_kept() {
        let t = MsiRoutes::default();
        t.set(&[route(24, 0xfee0_0000, 0x41)]).unwrap();
        assert_eq!(
            t.set(&[route(25, 0xfee0_0000, 0x42), route(4, 0xfee0_0000, 0x43)]),
            Err(MsiRouteError::PlatformGsi(4))
        );
        assert_eq!(t.request(24).unwrap().vector, 0x41);
        assert_eq!(t.request(25), None);
    }
}
