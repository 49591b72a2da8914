//! virtio-rng (device type 4): one request queue whose device-writable buffers the device fills
//! with bytes from the host's `getrandom`.
//!
//! - `device`: the `VirtioDevice` (features, activation, reset).
//! - `queue_handler`: the event-loop subscriber that runs when the driver kicks the queue.
//! - `request`: checks and fills one descriptor chain.
//! - `persist`: what a snapshot keeps of the device (nothing of its own).

mod device;
mod persist;
mod queue_handler;
mod request;

pub use device::{VirtioRng, RNG_QUEUE_SIZE};
pub use persist::RngState;
pub use request::{fill_request, RequestError, MAX_REQUEST_BYTES};
