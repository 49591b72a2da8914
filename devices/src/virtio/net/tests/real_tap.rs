//! virtio-net on a real tap, as root: each test creates its own network namespace on a
//! thread (`unshare(CLONE_NEWNET)`), so no host interface is touched and the namespace goes
//! away with the test's file descriptors. Frames are checked on the host side with an
//! AF_PACKET socket on the tap.

#![allow(clippy::unwrap_used)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{activate, frame, ETHERTYPE, RAM};
use crate::virtio::device::VirtioDevice;
use crate::virtio::net::tap::{Tap, TUN_F_CSUM};
use crate::virtio::net::{VirtioNet, VNET_HDR_LEN};
use crate::virtio::test_support::{guest_memory, TestLoop};

/// Runs `f` on a thread in a new network namespace (gone once its fds are closed).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap()
}

/// An AF_PACKET socket on interface `name` for our test EtherType.
fn packet_socket(name: &str) -> OwnedFd {
    let proto = ETHERTYPE.to_be();
    // SAFETY: plain socket creation; checked below.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        raw >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: `cname` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(ifindex, 0, "no interface {name}");
    // SAFETY: all-zero is a valid sockaddr_ll, filled in below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: `tv` is a valid timeval of the given size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    sock
}

#[test]
fn real_tap_in_a_namespace_carries_frames_both_ways() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates a tap in a network namespace and must run as root"
    );
    let (tap, sock) = in_new_netns(|| {
        let tap = Tap::open("sktest0").expect("create a tap in the new namespace");
        let sock = packet_socket("sktest0");
        (tap, sock)
    });
    assert_ne!(
        tap.supported_offloads() & TUN_F_CSUM,
        0,
        "tap checksum offload probed"
    );
    let mut dev = VirtioNet::new(tap, None).unwrap();
    let offered = dev.device_features();
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut d = activate(&mut dev, &mem, &lp, offered);

    // Guest to host: the frame shows up on the tap interface.
    let out = frame(b"skiff tx over a real tap");
    let head = d.send(0x10_0000, &out);
    lp.turn();
    assert_eq!(d.tx.take_used(), vec![(head, 0)]);
    let mut buf = [0u8; 2048];
    // SAFETY: reads at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(
        n > 0,
        "no frame on the tap: {}",
        std::io::Error::last_os_error()
    );
    assert_eq!(&buf[..n as usize], out.as_slice());

    // Host to guest: a frame sent on the interface reaches a guest buffer (the kernel may
    // send its own IPv6 frames on a fresh link too, so offer several and look for ours).
    let back = frame(b"skiff rx over a real tap");
    let heads: Vec<u16> = (0..8)
        .map(|i| d.offer_rx(0x20_0000 + i * 0x1000, 0x1000))
        .collect();
    // SAFETY: sends `back.len()` bytes from `back`.
    let sent = unsafe { libc::send(sock.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
    assert_eq!(
        sent,
        back.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    let mut found = false;
    for _ in 0..50 {
        lp.wait(100);
        for (head, len) in d.rx.take_used() {
            let i = heads.iter().position(|&h| h == head).unwrap() as u64;
            let got = d.read(0x20_0000 + i * 0x1000, len as usize);
            if got.len() > VNET_HDR_LEN && got[VNET_HDR_LEN..] == back[..] {
                found = true;
            }
        }
        if found {
            break;
        }
    }
    assert!(found, "the frame sent on the tap never reached the guest");
    assert!(!d.signals.needs_reset());
    dev.reset();
}

/// Drops CAP_NET_ADMIN from this thread's effective capabilities.
fn drop_net_admin() {
    const CAP_NET_ADMIN: u32 = 12;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget reads `header` and fills both `data` entries, as version 3 requires.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: capset reads `header` and both `data` entries.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

#[test]
fn creating_a_tap_without_cap_net_admin_is_a_clear_error() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test drops CAP_NET_ADMIN in a network namespace and must run as root"
    );
    let err = in_new_netns(|| {
        drop_net_admin();
        Tap::open("sknoperm0").map(|_| ()).unwrap_err().to_string()
    });
    assert!(
        err.starts_with("tap sknoperm0: not allowed to create or attach it (needs CAP_NET_ADMIN"),
        "{err}"
    );
}
