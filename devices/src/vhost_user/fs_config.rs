//! virtio-fs's device configuration space (`struct virtio_fs_config`: `tag[36]`, NUL-padded, then
//! `num_request_queues` as a little-endian u32), as the guest sees it behind a vhost-user-fs
//! device.
//!
//! The backend's own (`GET_CONFIG`) is used when it offers one; most backends (virtiofsd among
//! them) do not, and skiff builds it from `tag=` and `queues=`. Either way the result agrees
//! with the queues skiff exposes: queue 0 is the high-priority queue, queues 1.. are request
//! queues, so `num_request_queues` is at most `queues - 1` (a backend claiming more, or 0, is
//! corrected). A backend configuration with an empty tag takes `tag=`; with neither, the device
//! cannot be mounted and building it fails.

use super::config::{VhostUserConfig, VhostUserKind, FS_TAG_BYTES};

/// Why no configuration space could be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsConfigProblem {
    /// Neither the backend nor `tag=` names the mount tag.
    NoTag,
}

/// The configuration space for `cfg` (a `type=fs` device), from the backend's `GET_CONFIG`
/// reply `from_backend` if there was one.
pub fn fs_config_space(
    cfg: &VhostUserConfig,
    from_backend: Option<Vec<u8>>,
) -> Result<Vec<u8>, FsConfigProblem> {
    let len = VhostUserKind::Fs.config_len();
    let mut config = from_backend.unwrap_or_default();
    config.resize(len, 0);
    if config[..FS_TAG_BYTES].iter().all(|&b| b == 0) {
        let tag = cfg.tag.as_deref().ok_or(FsConfigProblem::NoTag)?;
        let n = tag.len().min(FS_TAG_BYTES);
        config[..n].copy_from_slice(&tag.as_bytes()[..n]);
    } else if let Some(tag) = &cfg.tag {
        if !tag_matches(&config[..FS_TAG_BYTES], tag) {
            log::warn!(
                "vhost-user-fs {}: the backend's tag {:?} replaces tag={tag}",
                cfg.socket.display(),
                String::from_utf8_lossy(trim_nul(&config[..FS_TAG_BYTES]))
            );
        }
    }
    let exposed = u32::from(cfg.queues.saturating_sub(1));
    let field = &mut config[FS_TAG_BYTES..len];
    let claimed = <[u8; 4]>::try_from(&*field)
        .map(u32::from_le_bytes)
        .unwrap_or_default();
    if claimed == 0 || claimed > exposed {
        field.copy_from_slice(&exposed.to_le_bytes());
    }
    Ok(config)
}

fn trim_nul(tag: &[u8]) -> &[u8] {
    let end = tag.iter().position(|&b| b == 0).unwrap_or(tag.len());
    &tag[..end]
}

fn tag_matches(field: &[u8], tag: &str) -> bool {
    trim_nul(field) == tag.as_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const FS_CONFIG_BYTES: usize = FS_TAG_BYTES + 4;

    fn fs(tag: Option<&str>, queues: u16) -> VhostUserConfig {
        let mut cfg = VhostUserConfig::new(VhostUserKind::Fs, "/s");
        cfg.tag = tag.map(str::to_string);
        cfg.queues = queues;
        cfg
    }

    fn requests(config: &[u8]) -> u32 {
        u32::from_le_bytes(config[FS_TAG_BYTES..].try_into().unwrap())
    }

    #[test]
    fn built_from_tag_and_queues_without_a_backend_config() {
        let c = fs_config_space(&fs(Some("shared"), 3), None).unwrap();
        assert_eq!(c.len(), FS_CONFIG_BYTES);
        assert_eq!(&c[..6], b"shared");
        assert!(c[6..FS_TAG_BYTES].iter().all(|&b| b == 0));
        assert_eq!(requests(&c), 2);
        let long = "t".repeat(FS_TAG_BYTES);
        let c = fs_config_space(&fs(Some(&long), 2), None).unwrap();
        assert_eq!(&c[..FS_TAG_BYTES], long.as_bytes());
        assert_eq!(requests(&c), 1);
    }

    #[test]
    fn no_tag_anywhere_is_refused() {
        assert_eq!(
            fs_config_space(&fs(None, 2), None),
            Err(FsConfigProblem::NoTag)
        );
        assert_eq!(
            fs_config_space(&fs(None, 2), Some(vec![0; FS_CONFIG_BYTES])),
            Err(FsConfigProblem::NoTag)
        );
    }

    #[test]
    fn the_backend_config_wins_but_its_queue_count_is_bounded() {
        let mut backend = vec![0u8; FS_CONFIG_BYTES];
        backend[..4].copy_from_slice(b"back");
        backend[FS_TAG_BYTES..].copy_from_slice(&9u32.to_le_bytes());
        let c = fs_config_space(&fs(Some("mine"), 3), Some(backend.clone())).unwrap();
        assert_eq!(&c[..5], b"back\0");
        assert_eq!(requests(&c), 2, "9 claimed, 2 exposed");
        backend[FS_TAG_BYTES..].copy_from_slice(&1u32.to_le_bytes());
        let c = fs_config_space(&fs(None, 3), Some(backend.clone())).unwrap();
        assert_eq!(requests(&c), 1, "fewer than exposed is kept");
        backend[FS_TAG_BYTES..].copy_from_slice(&0u32.to_le_bytes());
        let c = fs_config_space(&fs(None, 3), Some(backend)).unwrap();
        assert_eq!(requests(&c), 2, "0 is corrected");
        // An empty backend tag takes tag=.
        let c = fs_config_space(&fs(Some("mine"), 2), Some(vec![0; 4])).unwrap();
        assert_eq!(&c[..5], b"mine\0");
        assert_eq!(requests(&c), 1);
    }
}
