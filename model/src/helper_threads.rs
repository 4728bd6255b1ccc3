//! Spare cores for one fit: helper threads that take chunks of its larger products.
//!
//! A training step hands out dozens of products of 5–70 µs each. rayon's workers go to sleep
//! between them, and waking a sleeping thread (on a VM, a halted vCPU) costs about as much as
//! the chunk it would take over: a fit whose products went through a rayon pool of two ran
//! slower than on one thread. These helpers spin for a while after their work before they
//! sleep, so during training a chunk starts within a fraction of a microsecond.
//!
//! A fit lends itself helpers with [`lend`]; its products find them with [`with_current`].
//! The fit's thread and its helpers are pinned to CPUs of their own: unpinned, a woken helper
//! was often placed on the fit's CPU, and the two took turns there (three 12-epoch KDDCUP99
//! fits of nine took 7.6–8.6 s, the others 5.6–6.4 s).

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::cpu_pinning::{self, SavedAffinity};

/// How long an idle helper spins before it sleeps: longer than the gaps between a step's
/// products and between steps, short enough that a finished fit frees its cores at once.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_millis(2);

const WAITING: u8 = 0;
const READY: u8 = 1;
const RUNNING: u8 = 2;
const DONE: u8 = 3;
const STOP: u8 = 4;

/// Work in numbered chunks, given a chunk's number.
type Work<'a> = dyn Fn(usize) + Sync + 'a;

/// A borrowed `&Work` with its lifetime erased, to cross to a helper.
#[derive(Clone, Copy)]
struct WorkPtr(*const Work<'static>);

// SAFETY: `Work` is `Sync`, so calling it from another thread is sound; the lifetime is kept
// by `HelperThreads::run_chunks`, which does not return before every helper is done with it.
unsafe impl Send for WorkPtr {}

/// One helper's mailbox.
struct Slot {
    state: AtomicU8,
    sleeping: AtomicBool,
    job: Mutex<Option<WorkPtr>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            state: AtomicU8::new(WAITING),
            sleeping: AtomicBool::new(false),
            job: Mutex::new(None),
            panic: Mutex::new(None),
        }
    }
}

/// Threads that run chunks of the work handed to [`HelperThreads::run_chunks`].
pub(crate) struct HelperThreads {
    slots: Vec<Arc<Slot>>,
    threads: Vec<JoinHandle<()>>,
}

impl HelperThreads {
    /// One helper per entry of `cpus`, pinned to that CPU where one is named; fewer where
    /// the system will not start more threads.
    fn start(cpus: &[Option<usize>]) -> Self {
        let mut helpers = HelperThreads {
            slots: Vec::with_capacity(cpus.len()),
            threads: Vec::with_capacity(cpus.len()),
        };
        for (index, &cpu) in cpus.iter().enumerate() {
            let slot = Arc::new(Slot::new());
            let for_thread = Arc::clone(&slot);
            let started = thread::Builder::new()
                .name(format!("dagmm-helper-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        cpu_pinning::pin_current_thread(cpu);
                    }
                    serve(&for_thread)
                });
            let Ok(handle) = started else { break };
            helpers.slots.push(slot);
            helpers.threads.push(handle);
        }
        helpers
    }

    /// How many threads can run chunks at once: the helpers and the caller.
    pub(crate) fn threads(&self) -> usize {
        self.slots.len() + 1
    }

    /// Runs `work(0)` … `work(chunks − 1)`, each once, here and on up to `chunks − 1` helpers,
    /// and returns when all have finished. Each thread takes the next chunk not yet taken, so
    /// a helper that falls behind (its CPU taken by other work) takes fewer, and one that has
    /// not started when the chunks run out is called off rather than waited for. A panic in
    /// any chunk is raised here once every thread has stopped.
    pub(crate) fn run_chunks(&self, chunks: usize, work: &Work<'_>) {
        let next = AtomicUsize::new(0);
        let take_chunks = |_: usize| {
            loop {
                let chunk = next.fetch_add(1, Ordering::Relaxed);
                if chunk >= chunks {
                    break;
                }
                work(chunk);
            }
        };
        let take_chunks: &Work<'_> = &take_chunks;
        let helpers = &self.slots[..chunks.saturating_sub(1).min(self.slots.len())];
        // SAFETY: only the lifetime changes; `WaitFor` below (also on unwinding) outlives
        // every helper's use of the pointer.
        let erased = WorkPtr(unsafe {
            std::mem::transmute::<*const Work<'_>, *const Work<'static>>(take_chunks)
        });
        for (slot, thread) in helpers.iter().zip(&self.threads) {
            // A chunk's panic left behind when the caller's own chunk panicked too.
            lock(&slot.panic).take();
            *lock(&slot.job) = Some(erased);
            // SeqCst against the helper's `sleeping` store and `state` load: either it sees
            // READY before it parks, or this sees it sleeping and wakes it.
            slot.state.store(READY, Ordering::SeqCst);
            if slot.sleeping.load(Ordering::SeqCst) {
                thread.thread().unpark();
            }
        }
        let waiting = WaitFor(helpers);
        take_chunks(0);
        drop(waiting);
        for slot in helpers {
            if let Some(panic) = lock(&slot.panic).take() {
                resume_unwind(panic);
            }
        }
    }
}

impl Drop for HelperThreads {
    fn drop(&mut self) {
        for (slot, thread) in self.slots.iter().zip(&self.threads) {
            slot.state.store(STOP, Ordering::SeqCst);
            thread.thread().unpark();
        }
        for thread in self.threads.drain(..) {
            // A helper catches its work's panics, so joining cannot fail.
            let _ = thread.join();
        }
    }
}

/// Waits, when dropped, until each of its helpers has finished its work, or calls off those
/// that have not started it.
struct WaitFor<'a>(&'a [Arc<Slot>]);

impl Drop for WaitFor<'_> {
    fn drop(&mut self) {
        for slot in self.0 {
            let called_off = slot
                .state
                .compare_exchange(READY, DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if called_off {
                continue;
            }
            let started = Instant::now();
            let mut spins = 0u32;
            while slot.state.load(Ordering::Acquire) != DONE {
                spins = spins.wrapping_add(1);
                // A helper that lost its core (another process, a sleeping vCPU) gets it back
                // sooner when this thread yields.
                if spins.is_multiple_of(1024) && started.elapsed() > SPIN_BEFORE_SLEEP {
                    thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// A helper's loop: wait for READY (spinning, then asleep), take the work unless the owner
/// called it off meanwhile, run it, report DONE.
fn serve(slot: &Slot) {
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            match slot.state.load(Ordering::Acquire) {
                READY => break,
                STOP => return,
                _ => {}
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || idle_since.elapsed() < SPIN_BEFORE_SLEEP {
                std::hint::spin_loop();
                continue;
            }
            slot.sleeping.store(true, Ordering::SeqCst);
            if !matches!(slot.state.load(Ordering::SeqCst), READY | STOP) {
                thread::park();
            }
            slot.sleeping.store(false, Ordering::SeqCst);
            idle_since = Instant::now();
        }
        let taken = slot
            .state
            .compare_exchange(READY, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !taken {
            continue;
        }
        if let Some(work) = lock(&slot.job).take() {
            // SAFETY: the owner keeps the work alive until this slot reports DONE.
            let outcome = catch_unwind(AssertUnwindSafe(|| unsafe { (*work.0)(0) }));
            if let Err(panic) = outcome {
                *lock(&slot.panic) = Some(panic);
            }
        }
        slot.state.store(DONE, Ordering::Release);
    }
}

/// A mutex whose holders never leave its value half-written, so a poisoned one is still good.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    static CURRENT: RefCell<Option<HelperThreads>> = const { RefCell::new(None) };
    /// Whether this thread's helpers take chunks now ([`SplitChooser`]).
    static SPLITTING: Cell<bool> = const { Cell::new(true) };
}

/// CPUs pinned by lent helpers and their fits, so that two fits never pin to the same one.
static CLAIMED_CPUS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Helpers for this thread's work until the guard drops: up to `cores − 1` of them, each
/// pinned to a free CPU, with this thread pinned to another. None for one core, where threads
/// cannot be pinned ([`cpu_pinning::pinnable_cpus`]), or where fewer than two CPUs are free.
pub(crate) fn lend(cores: usize) -> Lent {
    let Some(cpus) = (cores > 1).then(|| claim_cpus(cores)).flatten() else {
        return Lent::install(None, Vec::new(), None);
    };
    let saved =
        SavedAffinity::of_current_thread().filter(|_| cpu_pinning::pin_current_thread(cpus[0]));
    if saved.is_none() {
        release_cpus(&cpus);
        return Lent::install(None, Vec::new(), None);
    }
    let helper_cpus: Vec<Option<usize>> = cpus[1..].iter().copied().map(Some).collect();
    Lent::install(Some(HelperThreads::start(&helper_cpus)), cpus, saved)
}

/// Up to `cores` CPUs no other lent group has pinned, the caller's own first (its caches hold
/// the work); `None` where fewer than two are free.
fn claim_cpus(cores: usize) -> Option<Vec<usize>> {
    let allowed = cpu_pinning::pinnable_cpus()?;
    let mut claimed = lock(&CLAIMED_CPUS);
    let mut free: Vec<usize> = allowed
        .into_iter()
        .filter(|cpu| !claimed.contains(cpu))
        .collect();
    let here = cpu_pinning::current_cpu();
    if let Some(position) = here.and_then(|here| free.iter().position(|&cpu| cpu == here)) {
        free[..=position].rotate_right(1);
    }
    free.truncate(cores);
    if free.len() < 2 {
        return None;
    }
    claimed.extend(&free);
    Some(free)
}

fn release_cpus(cpus: &[usize]) {
    lock(&CLAIMED_CPUS).retain(|cpu| !cpus.contains(cpu));
}

/// Gives this thread's helpers back (stopping them), unpins it and frees the CPUs when
/// dropped.
pub(crate) struct Lent {
    previous: Option<HelperThreads>,
    claimed: Vec<usize>,
    saved: Option<SavedAffinity>,
}

impl Lent {
    /// Makes `helpers` this thread's until the guard drops.
    fn install(
        helpers: Option<HelperThreads>,
        claimed: Vec<usize>,
        saved: Option<SavedAffinity>,
    ) -> Self {
        let previous = CURRENT.with(|current| current.replace(helpers));
        Lent {
            previous,
            claimed,
            saved,
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let previous = self.previous.take();
        let lent = CURRENT.with(|current| current.replace(previous));
        drop(lent);
        if let Some(saved) = self.saved.take() {
            saved.restore();
        }
        release_cpus(&self.claimed);
    }
}

/// Unpinned helpers for this thread until the guard drops, whatever the CPUs: for tests of the
/// split work on any machine.
#[cfg(test)]
pub(crate) fn lend_unpinned(helpers: usize) -> Lent {
    Lent::install(
        Some(HelperThreads::start(&vec![None; helpers])),
        Vec::new(),
        None,
    )
}

/// Calls `f` with this thread's helpers, if it has any and splitting is on.
pub(crate) fn with_current<R>(f: impl FnOnce(Option<&HelperThreads>) -> R) -> R {
    CURRENT.with(|current| f(current.borrow().as_ref().filter(|_| SPLITTING.get())))
}

/// Steps in each cycle that run split, then as many whole, to time both.
const PROBE_STEPS: u64 = 8;
/// Steps per cycle: the two probes, then the faster way.
const CYCLE_STEPS: u64 = 128;

/// Chooses, a training step at a time, whether this thread's helpers take chunks. On a VM two
/// busy vCPUs can run much slower than one (see RESULTS), so each cycle of steps times a few
/// steps split and a few whole and runs the rest the faster way. The choice changes only
/// which thread computes a chunk, never the bits.
pub(crate) struct SplitChooser {
    step: u64,
    /// Time of the probe steps: split, then whole.
    probes: [Duration; 2],
    started: Instant,
}

impl SplitChooser {
    pub(crate) fn new() -> Self {
        SplitChooser {
            step: 0,
            probes: [Duration::ZERO; 2],
            started: Instant::now(),
        }
    }

    /// Sets splitting on or off for the step about to run.
    pub(crate) fn start_step(&mut self) {
        let phase = self.step % CYCLE_STEPS;
        if phase == 0 {
            self.probes = [Duration::ZERO; 2];
        }
        let split = match phase {
            p if p < PROBE_STEPS => true,
            p if p < 2 * PROBE_STEPS => false,
            _ => self.probes[0] <= self.probes[1],
        };
        SPLITTING.set(split);
        self.started = Instant::now();
    }

    /// Records the step that has just run.
    pub(crate) fn end_step(&mut self) {
        let phase = self.step % CYCLE_STEPS;
        if phase < 2 * PROBE_STEPS {
            self.probes[usize::from(phase >= PROBE_STEPS)] += self.started.elapsed();
        }
        self.step += 1;
    }
}

impl Drop for SplitChooser {
    fn drop(&mut self) {
        SPLITTING.set(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_chunk_runs_once() {
        let helpers = HelperThreads::start(&[None; 3]);
        assert_eq!(helpers.threads(), 4);
        for chunks in 0..=9 {
            let runs: Vec<AtomicUsize> = (0..9).map(|_| AtomicUsize::new(0)).collect();
            helpers.run_chunks(chunks, &|chunk| {
                runs[chunk].fetch_add(1, Ordering::Relaxed);
            });
            let counts: Vec<usize> = runs.iter().map(|r| r.load(Ordering::Relaxed)).collect();
            let expected: Vec<usize> = (0..9).map(|c| usize::from(c < chunks)).collect();
            assert_eq!(counts, expected, "{chunks} chunks");
        }
    }

    #[test]
    fn chunks_run_on_two_threads_at_once() {
        let helpers = HelperThreads::start(&[None]);
        for round in 0..3 {
            if round > 0 {
                // Asleep by now: the next round has to wake it.
                thread::sleep(SPIN_BEFORE_SLEEP * 3);
            }
            // Each chunk waits until the other has started: on one thread this cannot finish.
            let started = AtomicUsize::new(0);
            let threads = Mutex::new(Vec::new());
            helpers.run_chunks(2, &|_| {
                started.fetch_add(1, Ordering::SeqCst);
                lock(&threads).push(thread::current().id());
                let waiting_since = Instant::now();
                while started.load(Ordering::SeqCst) < 2 {
                    assert!(waiting_since.elapsed() < Duration::from_secs(10), "alone");
                    std::hint::spin_loop();
                }
            });
            let threads = threads.into_inner().unwrap();
            assert_eq!(threads.len(), 2);
            assert_ne!(threads[0], threads[1], "round {round}");
        }
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_and_the_helpers_keep_working() {
        let helpers = HelperThreads::start(&[None]);
        for _ in 0..20 {
            let caught = catch_unwind(AssertUnwindSafe(|| {
                helpers.run_chunks(4, &|chunk| assert_ne!(chunk, 2, "chunk two fails"))
            }));
            assert!(caught.is_err());
        }
        let ran = AtomicUsize::new(0);
        helpers.run_chunks(4, &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn lent_helpers_are_this_threads_until_the_guard_drops() {
        assert!(with_current(|h| h.is_none()));
        {
            let _lent = lend_unpinned(2);
            assert_eq!(with_current(|h| h.map(HelperThreads::threads)), Some(3));
            let other = thread::spawn(|| with_current(|h| h.is_none()));
            assert!(other.join().unwrap(), "another thread has none");
            {
                let _one = lend(1);
                assert!(with_current(|h| h.is_none()), "one core lends none");
            }
            assert_eq!(with_current(|h| h.map(HelperThreads::threads)), Some(3));
        }
        assert!(with_current(|h| h.is_none()));
    }

    #[test]
    fn the_chooser_probes_both_ways_and_keeps_the_faster() {
        for whole_is_slower in [true, false] {
            let mut chooser = SplitChooser::new();
            let mut splits = Vec::new();
            for _ in 0..2 * CYCLE_STEPS {
                chooser.start_step();
                let split = SPLITTING.get();
                splits.push(split);
                if split == whole_is_slower {
                    // The faster way: no time at all.
                } else {
                    thread::sleep(Duration::from_millis(1));
                }
                chooser.end_step();
            }
            for cycle in splits.chunks(CYCLE_STEPS as usize) {
                let (probes, rest) = cycle.split_at(2 * PROBE_STEPS as usize);
                assert!(probes[..PROBE_STEPS as usize].iter().all(|&s| s));
                assert!(probes[PROBE_STEPS as usize..].iter().all(|&s| !s));
                assert!(
                    rest.iter().all(|&s| s == whole_is_slower),
                    "{whole_is_slower}"
                );
            }
            drop(chooser);
            assert!(SPLITTING.get(), "splitting is on again");
        }
    }

    #[test]
    fn pinned_helpers_claim_cpus_of_their_own_and_give_them_back() {
        let _one_at_a_time = crate::testing::PINNING.lock();
        let allowed_before = cpu_pinning::allowed_cpus();
        let cpus = cpu_pinning::pinnable_cpus().map_or(0, |cpus| cpus.len());
        {
            let _lent = lend(2);
            let threads = with_current(|h| h.map_or(1, HelperThreads::threads));
            // Two threads wherever two CPUs can be pinned.
            assert_eq!(threads, if cpus >= 2 { 2 } else { 1 });
            let claimed = lock(&CLAIMED_CPUS).clone();
            assert_eq!(claimed.len(), if threads > 1 { 2 } else { 0 });
            if threads > 1 {
                assert_ne!(claimed[0], claimed[1]);
                assert_eq!(cpu_pinning::current_cpu(), Some(claimed[0]), "pinned here");
            }
        }
        assert!(lock(&CLAIMED_CPUS).is_empty(), "given back");
        assert_eq!(
            cpu_pinning::allowed_cpus(),
            allowed_before,
            "unpinned again"
        );
    }
}
