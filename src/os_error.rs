//! The errno sets srvlb acts on, in one place and by name: which failures mean this host is
//! out of descriptors or memory (so retrying at once, or blaming a backend, would be wrong).
//! The accept loops back off on them, the admin endpoint gives up its spare descriptor, and
//! a failed connect blames nobody.

use std::io;

use rustix::io::Errno;

/// The process or the system has no descriptor left (EMFILE, ENFILE).
pub(crate) fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(Errno::from_io_error(e), Some(Errno::MFILE | Errno::NFILE))
}

/// This host is out of a resource a new socket needs: descriptors, socket buffers (ENOBUFS)
/// or memory (ENOMEM).
pub(crate) fn out_of_resources(e: &io::Error) -> bool {
    out_of_descriptors(e)
        || matches!(Errno::from_io_error(e), Some(Errno::NOBUFS | Errno::NOMEM))
        || e.kind() == io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.raw_os_error())
    }

    #[test]
    fn descriptors_and_memory_are_this_hosts_shortage_and_nothing_else_is() {
        for e in [Errno::MFILE, Errno::NFILE] {
            assert!(out_of_descriptors(&errno(e)), "{e:?}");
            assert!(out_of_resources(&errno(e)), "{e:?}");
        }
        for e in [Errno::NOBUFS, Errno::NOMEM] {
            assert!(!out_of_descriptors(&errno(e)), "{e:?}");
            assert!(out_of_resources(&errno(e)), "{e:?}");
        }
        assert!(out_of_resources(&io::ErrorKind::OutOfMemory.into()));
        for e in [
            Errno::CONNABORTED,
            Errno::PERM,
            Errno::CONNREFUSED,
            Errno::INVAL,
        ] {
            assert!(!out_of_resources(&errno(e)), "{e:?}");
        }
    }
}
