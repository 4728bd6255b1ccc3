//! Threads pinned to CPUs of their own, on Linux with glibc; elsewhere nothing is pinned.
//!
//! Threads that wake each other many times a second (scoring's chunks, a fit's helpers) are
//! often placed by Linux on the waking thread's CPU, where they take turns while another CPU
//! idles. Pinning each to its own CPU keeps them apart.

/// The CPUs this process may run on, when pinning threads to them is sound: at least two, and
/// no fewer usable than allowed (a container's CPU quota on a larger machine makes fixed CPUs
/// a gamble, as they may be busy with others' work while free ones idle). `None` otherwise.
pub fn pinnable_cpus() -> Option<Vec<usize>> {
    let allowed = allowed_cpus()?;
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    (allowed.len() >= 2 && usable >= allowed.len()).then_some(allowed)
}

/// The CPUs the calling thread may run on, where the system says.
pub(crate) fn allowed_cpus() -> Option<Vec<usize>> {
    imp::allowed_cpus()
}

/// Pins the calling thread to `cpu`; false where that was refused or is not supported.
pub fn pin_current_thread(cpu: usize) -> bool {
    imp::pin_current_thread(cpu)
}

/// The CPU the calling thread runs on now, where the system says.
pub(crate) fn current_cpu() -> Option<usize> {
    imp::current_cpu()
}

/// The calling thread's CPUs as they are now, to put back with [`SavedAffinity::restore`].
pub(crate) struct SavedAffinity(imp::Mask);

impl SavedAffinity {
    pub(crate) fn of_current_thread() -> Option<Self> {
        imp::current_mask().map(SavedAffinity)
    }

    pub(crate) fn restore(self) {
        imp::set_mask(&self.0);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    pub(super) type Mask = libc::cpu_set_t;

    fn mask_size() -> usize {
        std::mem::size_of::<libc::cpu_set_t>()
    }

    pub(super) fn current_mask() -> Option<Mask> {
        // SAFETY: `cpu_set_t` is plain bits, all zeros being the empty set, and the call gets
        // a live set of the size it is told.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            (libc::sched_getaffinity(0, mask_size(), &mut set) == 0).then_some(set)
        }
    }

    pub(super) fn set_mask(mask: &Mask) -> bool {
        // SAFETY: as above.
        unsafe { libc::sched_setaffinity(0, mask_size(), mask) == 0 }
    }

    pub(super) fn allowed_cpus() -> Option<Vec<usize>> {
        let set = current_mask()?;
        Some(
            (0..libc::CPU_SETSIZE as usize)
                // SAFETY: the index is below CPU_SETSIZE, the set's size.
                .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
                .collect(),
        )
    }

    pub(super) fn pin_current_thread(cpu: usize) -> bool {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        // SAFETY: as above; the index is below CPU_SETSIZE.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            set
        };
        set_mask(&set)
    }

    pub(super) fn current_cpu() -> Option<usize> {
        // SAFETY: no arguments; a negative answer is an error.
        usize::try_from(unsafe { libc::sched_getcpu() }).ok()
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) type Mask = ();

    pub(super) fn current_mask() -> Option<Mask> {
        None
    }

    pub(super) fn set_mask(_: &Mask) -> bool {
        false
    }

    pub(super) fn allowed_cpus() -> Option<Vec<usize>> {
        None
    }

    pub(super) fn pin_current_thread(_: usize) -> bool {
        false
    }

    pub(super) fn current_cpu() -> Option<usize> {
        None
    }
}
