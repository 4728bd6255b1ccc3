//! Spare cores for one fit: helper threads that take chunks of its larger products and of its
//! row-wise work, and a layer's weight gradient while the fit's thread forms its input gradient.
//!
//! A training step hands out dozens of products of 5–70 µs each. rayon's workers go to sleep
//! between them, and waking a sleeping thread (on a VM, a halted vCPU) costs about as much as
//! the chunk it would take over: a fit whose products went through a rayon pool of two ran
//! slower than on one thread. These helpers spin for a while after their work before they
//! sleep, so during training a chunk starts within a fraction of a microsecond.
//!
//! A fit lends itself helpers with [`lend`]; its products find them with [`with_current`], its
//! row-wise kernels through [`rows_written_in_chunks`], a layer's two gradient products
//! through [`join`].
//! The fit's thread and its helpers are pinned to CPUs of their own: unpinned, a woken helper
//! was often placed on the fit's CPU, and the two took turns there (three 12-epoch KDDCUP99
//! fits of nine took 7.6–8.6 s, the others 5.6–6.4 s).

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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

/// Writes the values of a range of rows, given the range and the rows' slice of the buffer.
pub(crate) type WriteRows<'a, T> = dyn Fn(Range<usize>, &mut [MaybeUninit<T>]) + Sync + 'a;

/// Work given a number: a chunk's, or, as a helper takes it, the number of the thread (the
/// owner 0, its helpers from 1).
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
    /// Background work ([`background`]), run a piece at a time while no chunks wait.
    background: Mutex<VecDeque<Arc<dyn Pieces>>>,
    has_background: AtomicBool,
}

impl Slot {
    fn new() -> Self {
        Slot {
            state: AtomicU8::new(WAITING),
            sleeping: AtomicBool::new(false),
            job: Mutex::new(None),
            panic: Mutex::new(None),
            background: Mutex::new(VecDeque::new()),
            has_background: AtomicBool::new(false),
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
                    serve(&for_thread, index + 1)
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
    /// and returns when all have finished. Each thread has a share of consecutive chunks (this
    /// thread the first), so work split the same way step after step (rows of one batch through
    /// the layers) finds its rows in the cache of the thread that wrote them. A thread that
    /// has done its share takes the others' not yet started, from the far end, so a helper that
    /// falls behind (its CPU taken by other work) does less, and one that has not started when
    /// the chunks run out is called off rather than waited for. A panic in any chunk is raised
    /// here once every thread has stopped.
    pub(crate) fn run_chunks(&self, chunks: usize, work: &Work<'_>) {
        let helpers = &self.slots[..chunks.saturating_sub(1).min(self.slots.len())];
        let threads = helpers.len() + 1;
        let taken: Vec<AtomicBool> = (0..chunks).map(|_| AtomicBool::new(false)).collect();
        let take_chunks = |thread: usize| {
            let share = (0..chunks).filter(|&chunk| chunk * threads / chunks == thread);
            for chunk in share.chain((0..chunks).rev()) {
                if !taken[chunk].swap(true, Ordering::AcqRel) {
                    work(chunk);
                }
            }
        };
        let take_chunks: &Work<'_> = &take_chunks;
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
        {
            // The helpers are busy: work inside a chunk runs where the chunk runs.
            let _not_nested = SplittingOff::new();
            take_chunks(0);
        }
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

/// Helper `thread`'s loop: wait for READY (spinning, then asleep), take the work unless the
/// owner called it off meanwhile, run it, report DONE.
fn serve(slot: &Slot, thread: usize) {
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            match slot.state.load(Ordering::Acquire) {
                READY => break,
                STOP => return,
                _ => {}
            }
            if slot.has_background.load(Ordering::Acquire) {
                run_background_piece(slot);
                idle_since = Instant::now();
                continue;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || idle_since.elapsed() < SPIN_BEFORE_SLEEP {
                std::hint::spin_loop();
                continue;
            }
            slot.sleeping.store(true, Ordering::SeqCst);
            if !matches!(slot.state.load(Ordering::SeqCst), READY | STOP)
                && !slot.has_background.load(Ordering::SeqCst)
            {
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
            let outcome = catch_unwind(AssertUnwindSafe(|| unsafe { (*work.0)(thread) }));
            if let Err(panic) = outcome {
                *lock(&slot.panic) = Some(panic);
            }
        }
        slot.state.store(DONE, Ordering::Release);
    }
}

/// Runs one piece of the helper's oldest background work, and drops that work from its queue
/// once nothing of it is left.
fn run_background_piece(slot: &Slot) {
    let work = {
        let queue = lock(&slot.background);
        let Some(work) = queue.front().cloned() else {
            // Cleared under the queue's lock, so that work pushed meanwhile keeps it set.
            slot.has_background.store(false, Ordering::Release);
            return;
        };
        work
    };
    if work.run_piece() {
        let mut queue = lock(&slot.background);
        if queue.front().is_some_and(|front| Arc::ptr_eq(front, &work)) {
            queue.pop_front();
        }
        if queue.is_empty() {
            slot.has_background.store(false, Ordering::Release);
        }
    }
}

/// Work a helper can do a piece at a time.
trait Pieces: Send + Sync {
    /// Runs the next piece; true when nothing is left.
    fn run_piece(&self) -> bool;
}

/// A piece of background work: `None` while more is left, the result after the last piece.
type Piece<'a, T> = dyn FnMut() -> Option<T> + Send + 'a;

enum BackgroundState<T> {
    Working(Box<Piece<'static, T>>),
    Done(T),
    Panicked(Box<dyn Any + Send>),
    /// Taken by [`Background::finish`], or dropped unfinished.
    Gone,
}

struct BackgroundWork<T> {
    state: Mutex<BackgroundState<T>>,
}

impl<T: Send> BackgroundWork<T> {
    /// Runs a piece where one is left, under the state's lock (so the owner never sees a piece
    /// half-run); true when nothing is left.
    fn piece(state: &mut BackgroundState<T>) -> bool {
        let BackgroundState::Working(piece) = state else {
            return true;
        };
        match catch_unwind(AssertUnwindSafe(piece)) {
            Ok(None) => false,
            Ok(Some(result)) => {
                *state = BackgroundState::Done(result);
                true
            }
            Err(panic) => {
                *state = BackgroundState::Panicked(panic);
                true
            }
        }
    }
}

impl<T: Send> Pieces for BackgroundWork<T> {
    fn run_piece(&self) -> bool {
        Self::piece(&mut lock(&self.state))
    }
}

/// Work handed to this thread's first helper to do in the background, a piece at a time,
/// while it has no chunks to take: between a step's products, where it would otherwise spin.
/// [`Background::finish`] returns the result, running here whatever pieces are left. Without
/// helpers every piece runs at `finish`, here. With splitting off the helper still takes it:
/// steps that keep their products whole (see [`SplitChooser`]) then still prepare the next
/// batch off this thread, which made those KDDCUP99 epochs about 6 % faster (0.366–0.370
/// against 0.387–0.397 s on two threads). Each piece must leave the work in a state the next
/// piece can carry on from, whichever thread runs it.
pub(crate) struct Background<'a, T: Send + 'static> {
    work: Arc<BackgroundWork<T>>,
    _borrows: PhantomData<&'a ()>,
}

/// Starts `pieces` as [`Background`] work.
pub(crate) fn background<'a, T: Send + 'static>(
    pieces: impl FnMut() -> Option<T> + Send + 'a,
) -> Background<'a, T> {
    let pieces: Box<Piece<'a, T>> = Box::new(pieces);
    // SAFETY: only the lifetime changes. The work runs only under its state's lock while it
    // is `Working`, and `Background` replaces it (dropping the closure) under that lock before
    // the borrows of 'a end, in `finish` or on drop.
    let pieces =
        unsafe { std::mem::transmute::<Box<Piece<'a, T>>, Box<Piece<'static, T>>>(pieces) };
    let work = Arc::new(BackgroundWork {
        state: Mutex::new(BackgroundState::Working(pieces)),
    });
    with_helpers(|helpers| {
        if let Some(slot) = helpers.and_then(|helpers| helpers.slots.first()) {
            lock(&slot.background).push_back(Arc::clone(&work) as Arc<dyn Pieces>);
            // SeqCst against the helper's `sleeping` store, as for READY in `run_chunks`.
            slot.has_background.store(true, Ordering::SeqCst);
            if slot.sleeping.load(Ordering::SeqCst)
                && let Some(thread) = helpers.and_then(|helpers| helpers.threads.first())
            {
                thread.thread().unpark();
            }
        }
    });
    Background {
        work,
        _borrows: PhantomData,
    }
}

impl<T: Send + 'static> Background<'_, T> {
    /// The result: the helper's, or this thread's after it runs the pieces left. A piece's
    /// panic is raised here.
    pub(crate) fn finish(self) -> T {
        let mut state = lock(&self.work.state);
        while !BackgroundWork::piece(&mut state) {}
        match std::mem::replace(&mut *state, BackgroundState::Gone) {
            BackgroundState::Done(result) => result,
            BackgroundState::Panicked(panic) => resume_unwind(panic),
            BackgroundState::Working(_) | BackgroundState::Gone => {
                unreachable!("background work runs until it is done or panics, and is taken once")
            }
        }
    }
}

impl<T: Send + 'static> Drop for Background<'_, T> {
    fn drop(&mut self) {
        // Unfinished work borrows what is about to go: drop it where no piece can be running.
        let unfinished = std::mem::replace(&mut *lock(&self.work.state), BackgroundState::Gone);
        drop(unfinished);
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

/// Turns this thread's splitting off until dropped, then back to what it was.
struct SplittingOff(bool);

impl SplittingOff {
    fn new() -> Self {
        SplittingOff(SPLITTING.replace(false))
    }
}

impl Drop for SplittingOff {
    fn drop(&mut self) {
        SPLITTING.set(self.0);
    }
}

/// Calls `f` with this thread's helpers, if it has any and splitting is on.
pub(crate) fn with_current<R>(f: impl FnOnce(Option<&HelperThreads>) -> R) -> R {
    with_helpers(|helpers| f(helpers.filter(|_| SPLITTING.get())))
}

/// Whether this thread has helpers, splitting on or off: whether background work runs off it.
pub(crate) fn has_helpers() -> bool {
    with_helpers(|helpers| helpers.is_some())
}

/// Calls `f` with this thread's helpers, if it has any, splitting on or off.
fn with_helpers<R>(f: impl FnOnce(Option<&HelperThreads>) -> R) -> R {
    CURRENT.with(|current| f(current.borrow().as_ref()))
}

/// Chunks per thread of split work, so that a thread whose CPU is taken by other work for a
/// while leaves its share to the others instead of holding them up.
pub(crate) const CHUNKS_PER_THREAD: usize = 2;

/// Values of simple per-value work (a copy, a multiply and add) that a chunk must hold to be
/// worth handing over: a hand-over costs about a microsecond, 2¹⁴ values a few.
const MIN_CHUNK_VALUES: usize = 1 << 14;

/// The rows of chunk `chunk` of `chunks` over `0..rows`: whole blocks of eight rows, the last
/// chunk taking what is left (possibly nothing).
pub(crate) fn chunk_rows(rows: usize, chunk: usize, chunks: usize) -> Range<usize> {
    let per_chunk = rows.div_ceil(chunks).next_multiple_of(8);
    (chunk * per_chunk).min(rows)..((chunk + 1) * per_chunk).min(rows)
}

/// Into how many chunks `values` values of simple work are worth splitting on this thread
/// now: 1 where it has no helpers or splitting is off, else as many as keep each chunk worth
/// handing over, at most [`CHUNKS_PER_THREAD`] per thread.
pub(crate) fn chunks_worth(values: usize) -> usize {
    match threads_now() {
        1 => 1,
        threads => (values / MIN_CHUNK_VALUES).clamp(1, CHUNKS_PER_THREAD * threads),
    }
}

/// How many threads can take chunks on this thread now: it and its helpers where it has them
/// and splitting is on, else 1.
pub(crate) fn threads_now() -> usize {
    with_current(|helpers| helpers.map_or(1, HelperThreads::threads))
}

/// Runs `work(0)` … `work(chunks − 1)`: on this thread's helpers where it has them and
/// splitting is on, else one after another here.
pub(crate) fn run_in_chunks(chunks: usize, work: &(dyn Fn(usize) + Sync)) {
    with_current(|helpers| match helpers.filter(|_| chunks > 1) {
        Some(helpers) => helpers.run_chunks(chunks, work),
        None => (0..chunks).for_each(work),
    })
}

/// `first()` here and `second()` on a helper, at once, where this thread has helpers and
/// splitting is on; else one after the other here. Either way the work inside each runs
/// whole, on one thread, so the results are the same bits. Like `rayon::join`, on the fit's
/// spinning helpers.
pub(crate) fn join<A: Send, B: Send>(
    first: impl FnOnce() -> A + Send,
    second: impl FnOnce() -> B + Send,
) -> (A, B) {
    if threads_now() == 1 {
        return (first(), second());
    }
    let (first, second) = (Mutex::new(Some(first)), Mutex::new(Some(second)));
    let (first_result, second_result) = (Mutex::new(None), Mutex::new(None));
    run_in_chunks(2, &|chunk| {
        if chunk == 0 {
            let first = lock(&first).take().expect("the first work runs once");
            *lock(&first_result) = Some(first());
        } else {
            let second = lock(&second).take().expect("the second work runs once");
            *lock(&second_result) = Some(second());
        }
    });
    let ran = "run_in_chunks runs every chunk before it returns";
    (
        first_result.into_inner().ok().flatten().expect(ran),
        second_result.into_inner().ok().flatten().expect(ran),
    )
}

/// How many chunks of rows [`rows_written_in_chunks`] makes: whole blocks of eight rows.
fn row_chunks(rows: usize, values_per_row: usize) -> usize {
    chunks_worth(rows.saturating_mul(values_per_row)).min(rows.div_ceil(8).max(1))
}

/// A row-major buffer of `rows` rows of `width` values, written by `write(rows, values)` for
/// chunks of rows (whole blocks of eight), each row worth `values_per_row` values of simple
/// work, split as [`chunks_worth`] says. For work whose rows are independent, so that the
/// split never changes a bit.
///
/// # Safety
/// `write` must initialise every value of the slice it is given.
pub(crate) unsafe fn rows_written_in_chunks<T: Send + Sync>(
    rows: usize,
    width: usize,
    values_per_row: usize,
    write: &WriteRows<'_, T>,
) -> Vec<T> {
    // SAFETY: the caller's.
    unsafe { rows_written_in_ranges(rows, width, &row_chunk_ranges(rows, values_per_row), write) }
}

/// The ranges of rows [`rows_written_in_chunks`] hands out ([`row_chunks`] of them).
fn row_chunk_ranges(rows: usize, values_per_row: usize) -> Vec<Range<usize>> {
    let chunks = row_chunks(rows, values_per_row);
    (0..chunks)
        .map(|chunk| chunk_rows(rows, chunk, chunks))
        .collect()
}

/// A row-major buffer of `rows` rows of `width` values, written by `write(range, values)` for
/// each of `ranges` (which must cover `0..rows` without overlap, in order), each on whichever
/// thread takes it. The values are not set beforehand: every one is written once.
///
/// # Safety
/// `write` must initialise every value of the slice it is given.
pub(crate) unsafe fn rows_written_in_ranges<T: Send + Sync>(
    rows: usize,
    width: usize,
    ranges: &[Range<usize>],
    write: &WriteRows<'_, T>,
) -> Vec<T> {
    let len = rows.checked_mul(width).expect("buffer size overflows");
    let mut buffer: Vec<T> = Vec::with_capacity(len);
    // SAFETY: the buffer has room for rows · width values; the caller's promise for `write`.
    unsafe {
        write_ranges(
            SharedBuffer::spare_of(&mut buffer),
            rows,
            width,
            ranges,
            write,
        )
    };
    // SAFETY: `write_ranges` wrote every value.
    unsafe { buffer.set_len(len) };
    buffer
}

/// Values whose first lies on a 64-byte boundary, the start of a cache line. A loop that
/// loads and stores whole 64-byte vectors from rows padded to whole vectors then never splits
/// one over two lines, which costs two accesses (three in four of them from `malloc`'s
/// 16-byte alignment): in a KDDCUP99 fit the sparse products of the first layer and of the
/// reconstruction took 34 µs a call where they took 41 to 42.
pub(crate) type LineAligned<T> = aligned_vec::AVec<T, aligned_vec::ConstAlign<64>>;

/// [`rows_written_in_chunks`] into a buffer that starts on a cache line ([`LineAligned`]).
///
/// # Safety
/// `write` must initialise every value of the slice it is given.
pub(crate) unsafe fn line_aligned_rows_written_in_chunks<T: Send + Sync>(
    rows: usize,
    width: usize,
    values_per_row: usize,
    write: &WriteRows<'_, T>,
) -> LineAligned<T> {
    let ranges = row_chunk_ranges(rows, values_per_row);
    let len = rows.checked_mul(width).expect("buffer size overflows");
    let buffer = LineAligned::<T>::with_capacity(64, len);
    let (start, align, _, capacity) = buffer.into_raw_parts();
    // SAFETY: the buffer has room for rows · width values; the caller's promise for `write`.
    unsafe {
        write_ranges(
            SharedBuffer(start.cast::<MaybeUninit<T>>()),
            rows,
            width,
            &ranges,
            write,
        )
    };
    // SAFETY: the parts are the buffer's own, and `write_ranges` wrote its first `len` values.
    unsafe { LineAligned::from_raw_parts(start, align, len, capacity) }
}

/// Rows written by `write` for each of `ranges` (covering `0..rows` in order) into the buffer
/// at `start`, each range on whichever thread takes it.
///
/// # Safety
/// `start` must have room for `rows · width` values and `write` must initialise every value of
/// the slice it is given.
unsafe fn write_ranges<T: Send + Sync>(
    start: SharedBuffer<MaybeUninit<T>>,
    rows: usize,
    width: usize,
    ranges: &[Range<usize>],
    write: &WriteRows<'_, T>,
) {
    let covered = ranges.iter().try_fold(0, |end, range| {
        (range.start == end && range.end >= range.start).then_some(range.end)
    });
    assert_eq!(covered, Some(rows), "ranges must cover the rows in order");
    run_in_chunks(ranges.len(), &|chunk| {
        let range = ranges[chunk].clone();
        // SAFETY: the buffer has room for rows · width values and outlives every chunk
        // (`run_in_chunks` returns when all are done); the ranges are disjoint rows inside it
        // (asserted above), so each slice is this chunk's alone.
        let values = unsafe {
            std::slice::from_raw_parts_mut(start.add(range.start * width), range.len() * width)
        };
        write(range, values);
    });
}

/// The start of a buffer whose disjoint parts chunks write.
pub(crate) struct SharedBuffer<T>(*mut T);

impl<T> SharedBuffer<T> {
    /// The unfilled part of `buffer`, for chunks to write before its length is set.
    pub(crate) fn spare_of(buffer: &mut Vec<T>) -> SharedBuffer<MaybeUninit<T>> {
        SharedBuffer(buffer.spare_capacity_mut().as_mut_ptr())
    }

    /// The element `offset` places from the start.
    ///
    /// # Safety
    /// It must lie inside the buffer.
    pub(crate) unsafe fn add(&self, offset: usize) -> *mut T {
        // SAFETY: the caller's.
        unsafe { self.0.add(offset) }
    }
}

impl<T> Clone for SharedBuffer<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedBuffer<T> {}

// SAFETY: chunks write disjoint parts through it, and the buffer outlives them.
unsafe impl<T: Send> Send for SharedBuffer<T> {}
unsafe impl<T: Send> Sync for SharedBuffer<T> {}

/// Steps in each cycle that run split, then as many whole, to time both.
const PROBE_STEPS: u64 = 8;
/// Steps per cycle: the two probes, then the faster way. A whole step takes about a quarter
/// longer than a split one on KDDCUP99, so the probes cost about 0.4 % of a cycle of 512 (1.6 %
/// of the 128 first used); the VM's slow spells last far longer than a cycle (about a second).
const CYCLE_STEPS: u64 = 512;

/// Chooses, a training step at a time, whether this thread's helpers take chunks. On a VM two
/// busy vCPUs can run much slower than one (see RESULTS), so each cycle of steps times a few
/// steps split and a few whole and runs the rest the way whose median probe step was faster.
/// The median, not the total: a single step held up for a few milliseconds (the first steps
/// of a fit, the VM taking the CPU away) outweighed the 6–7 ms by which eight split steps beat
/// eight whole ones on KDDCUP99, and sent a whole cycle down the slower way. Whole steps still
/// hand their background work to the helper ([`background`]). The choice changes only which
/// thread computes a chunk, never the bits.
pub(crate) struct SplitChooser {
    step: u64,
    /// Times of this cycle's probe steps: split, then whole.
    probes: [[Duration; PROBE_STEPS as usize]; 2],
    started: Instant,
}

impl SplitChooser {
    pub(crate) fn new() -> Self {
        SplitChooser {
            step: 0,
            probes: [[Duration::ZERO; PROBE_STEPS as usize]; 2],
            started: Instant::now(),
        }
    }

    /// Sets splitting on or off for the step about to run.
    pub(crate) fn start_step(&mut self) {
        let phase = self.step % CYCLE_STEPS;
        let split = match phase {
            p if p < PROBE_STEPS => true,
            p if p < 2 * PROBE_STEPS => false,
            _ => median(self.probes[0]) <= median(self.probes[1]),
        };
        SPLITTING.set(split);
        self.started = Instant::now();
    }

    /// Records the step that has just run.
    pub(crate) fn end_step(&mut self) {
        let phase = self.step % CYCLE_STEPS;
        if phase < 2 * PROBE_STEPS {
            let (way, step) = (
                (phase / PROBE_STEPS) as usize,
                (phase % PROBE_STEPS) as usize,
            );
            self.probes[way][step] = self.started.elapsed();
        }
        self.step += 1;
    }
}

/// The lower median of the probe steps' times.
fn median(mut times: [Duration; PROBE_STEPS as usize]) -> Duration {
    times.sort_unstable();
    times[(times.len() - 1) / 2]
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

    /// Background work of `pieces` pieces that counts the pieces run and notes the last thread
    /// (by name) to run one; its result is the list of pieces in the order run.
    fn counted_pieces<'a>(
        pieces: usize,
        runs: &'a AtomicUsize,
        ran_on: &'a Mutex<Option<String>>,
    ) -> impl FnMut() -> Option<Vec<usize>> + Send + 'a {
        let mut done = Vec::new();
        move || {
            done.push(runs.fetch_add(1, Ordering::SeqCst));
            *lock(ran_on) = thread::current().name().map(str::to_owned);
            (done.len() == pieces).then(|| std::mem::take(&mut done))
        }
    }

    #[test]
    fn background_work_runs_on_the_helper_between_chunks_and_gives_its_result() {
        let _lent = lend_unpinned(1);
        let (runs, ran_on) = (AtomicUsize::new(0), Mutex::new(None));
        let work = background(counted_pieces(5, &runs, &ran_on));
        // Chunks handed out meanwhile still run, on both threads.
        let chunk_runs: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
        run_in_chunks(4, &|chunk| {
            chunk_runs[chunk].fetch_add(1, Ordering::SeqCst);
        });
        assert!(
            chunk_runs
                .iter()
                .all(|runs| runs.load(Ordering::SeqCst) == 1)
        );
        // This thread runs no piece before `finish`: every piece run so far is the helper's.
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) < 5 {
            assert!(Instant::now() < deadline, "the helper never ran the pieces");
            std::hint::spin_loop();
        }
        assert_eq!(lock(&ran_on).as_deref(), Some("dagmm-helper-0"));
        assert_eq!(work.finish(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn background_work_goes_to_the_helper_with_splitting_off_too() {
        let _lent = lend_unpinned(1);
        let _whole = SplittingOff::new();
        assert_eq!(threads_now(), 1, "chunks stay here");
        let (runs, ran_on) = (AtomicUsize::new(0), Mutex::new(None));
        let work = background(counted_pieces(3, &runs, &ran_on));
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "the helper never ran the pieces");
            std::hint::spin_loop();
        }
        assert_eq!(lock(&ran_on).as_deref(), Some("dagmm-helper-0"));
        assert_eq!(work.finish(), vec![0, 1, 2]);
    }

    #[test]
    fn background_work_without_helpers_runs_here_at_finish() {
        let (runs, ran_on) = (AtomicUsize::new(0), Mutex::new(None));
        let work = background(counted_pieces(3, &runs, &ran_on));
        thread::sleep(Duration::from_millis(5));
        assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing runs before finish");
        assert_eq!(work.finish(), vec![0, 1, 2]);
        assert_eq!(*lock(&ran_on), thread::current().name().map(str::to_owned));
    }

    #[test]
    fn unfinished_background_work_stops_when_dropped_and_panics_reach_finish() {
        let _lent = lend_unpinned(1);
        // A piece that waits for a go: the helper stays inside the first until it is given.
        let go = AtomicBool::new(false);
        let runs = AtomicUsize::new(0);
        let work = background(|| {
            runs.fetch_add(1, Ordering::SeqCst);
            while !go.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            None::<()>
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "the helper never started the work"
            );
            std::hint::spin_loop();
        }
        go.store(true, Ordering::SeqCst);
        // Dropping waits out the piece in progress and no piece starts after it.
        drop(work);
        let after_drop = runs.load(Ordering::SeqCst);
        thread::sleep(Duration::from_millis(5));
        assert_eq!(runs.load(Ordering::SeqCst), after_drop);

        let failing = background(|| -> Option<()> { panic!("piece failed") });
        let raised = catch_unwind(AssertUnwindSafe(|| failing.finish()));
        assert!(raised.is_err());
        // The helper still takes chunks after the panic.
        let chunk_runs = AtomicUsize::new(0);
        run_in_chunks(4, &|_| {
            chunk_runs.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(chunk_runs.load(Ordering::SeqCst), 4);
    }

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
    fn join_runs_both_at_once_with_a_helper_and_in_turn_without() {
        // Each side waits until the other has started, so with a helper it cannot finish
        // on one thread; without one the two run in turn.
        let both_started = |started: &AtomicUsize, value: u32| {
            started.fetch_add(1, Ordering::SeqCst);
            let waiting_since = Instant::now();
            while started.load(Ordering::SeqCst) < 2 {
                assert!(waiting_since.elapsed() < Duration::from_secs(10), "alone");
                std::hint::spin_loop();
            }
            value
        };
        {
            let _lent = lend_unpinned(1);
            let started = AtomicUsize::new(0);
            let joined = join(
                || both_started(&started, 1),
                || (both_started(&started, 2), thread::current().id()),
            );
            assert_eq!((joined.0, joined.1.0), (1, 2));
        }
        let here = thread::current().id();
        assert_eq!(join(|| 1, || (2, thread::current().id())), (1, (2, here)));
    }

    #[test]
    fn each_thread_takes_its_own_share_of_chunks_first() {
        let helpers = HelperThreads::start(&[None]);
        let caller = thread::current().id();
        for _ in 0..5 {
            let started = [AtomicBool::new(false), AtomicBool::new(false)];
            let ran_on = Mutex::new(vec![None; 4]);
            // Chunk 0 (the caller's share) and chunk 2 (the helper's) wait for each other, and
            // chunk 1 for chunk 2: a helper that took chunk 1 before its own share would wait
            // there for a chunk no thread is free to take.
            let wait_for = |other: usize| {
                let waiting_since = Instant::now();
                while !started[other].load(Ordering::SeqCst) {
                    assert!(waiting_since.elapsed() < Duration::from_secs(10), "stuck");
                    std::hint::spin_loop();
                }
            };
            helpers.run_chunks(4, &|chunk| {
                lock(&ran_on)[chunk] = Some(thread::current().id());
                match chunk {
                    0 | 2 => {
                        started[chunk / 2].store(true, Ordering::SeqCst);
                        wait_for(1 - chunk / 2);
                    }
                    1 => wait_for(1),
                    _ => {}
                }
            });
            let ran_on = ran_on.into_inner().unwrap();
            assert_eq!(ran_on[0], Some(caller), "chunk 0 is the caller's");
            assert!(
                ran_on[2].is_some_and(|helper| helper != caller),
                "chunk 2 the helper's"
            );
            assert!(ran_on.iter().all(Option::is_some), "every chunk ran");
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
    fn chunks_of_rows_cover_every_row_once() {
        for m in [1, 7, 8, 9, 40, 300, 1023, 1024] {
            for chunks in 1..=5 {
                let ranges: Vec<Range<usize>> =
                    (0..chunks).map(|c| chunk_rows(m, c, chunks)).collect();
                let mut next = 0;
                for range in &ranges {
                    assert!(
                        range.start == next || range.is_empty(),
                        "{m} rows, {chunks} chunks"
                    );
                    assert!(range.start.is_multiple_of(8) || range.is_empty());
                    next = next.max(range.end);
                }
                assert_eq!(next, m, "{m} rows, {chunks} chunks");
            }
        }
    }

    #[test]
    fn buffers_written_in_chunks_get_every_row_once_whoever_writes_it() {
        fn write_rows(
            threads: &Mutex<Vec<thread::ThreadId>>,
            rows: Range<usize>,
            out: &mut [MaybeUninit<u64>],
        ) {
            lock(threads).push(thread::current().id());
            assert_eq!(out.len(), rows.len() * 3);
            for (row, values) in rows.zip(out.chunks_exact_mut(3)) {
                values.write_copy_of_slice(&[row as u64, 7, row as u64 * 2]);
            }
        }
        let want: Vec<u64> = (0..1001).flat_map(|r| [r, 7, r * 2]).collect();
        // Alone: one piece, here.
        let threads = Mutex::new(Vec::new());
        // SAFETY (here and below): `write_rows` writes every value it is given.
        let written =
            unsafe { rows_written_in_chunks(1001, 3, 1 << 20, &|r, o| write_rows(&threads, r, o)) };
        assert_eq!(written, want);
        assert_eq!(lock(&threads).len(), 1);
        let _lent = lend_unpinned(2);
        for (values_per_row, chunks) in [(1 << 20, 6), (64, 3), (1, 1)] {
            let threads = Mutex::new(Vec::new());
            let written = unsafe {
                rows_written_in_chunks(1001, 3, values_per_row, &|r, o| write_rows(&threads, r, o))
            };
            assert_eq!(written, want, "{values_per_row} values per row");
            assert_eq!(
                lock(&threads).len(),
                chunks,
                "{values_per_row} values per row"
            );
        }
        // Uneven ranges, some empty.
        let ranges = [0..0, 0..900, 900..901, 901..901, 901..1001];
        let threads = Mutex::new(Vec::new());
        let written =
            unsafe { rows_written_in_ranges(1001, 3, &ranges, &|r, o| write_rows(&threads, r, o)) };
        assert_eq!(written, want);
        let written =
            unsafe { rows_written_in_chunks(0, 3, 1 << 20, &|r, o| write_rows(&threads, r, o)) };
        assert!(written.is_empty());
        // Into a buffer on a cache line: the same values, from its first byte on a boundary.
        for values_per_row in [1 << 20, 64, 1] {
            let written = unsafe {
                line_aligned_rows_written_in_chunks(1001, 3, values_per_row, &|r, o| {
                    write_rows(&threads, r, o)
                })
            };
            assert_eq!(&written[..], &want[..]);
            assert_eq!(written.as_ptr() as usize % 64, 0);
        }
        let written = unsafe {
            line_aligned_rows_written_in_chunks(0, 3, 1 << 20, &|r, o| write_rows(&threads, r, o))
        };
        assert!(written.is_empty());
    }

    #[test]
    #[should_panic(expected = "cover the rows in order")]
    fn ranges_that_leave_a_gap_are_refused() {
        // SAFETY: refused before anything is written.
        unsafe {
            rows_written_in_ranges(10, 1, &[0..4, 5..10], &|_, _: &mut [MaybeUninit<f32>]| {})
        };
    }

    #[test]
    fn the_chooser_probes_both_ways_and_keeps_the_faster_despite_one_slow_step() {
        for whole_is_slower in [true, false] {
            let mut chooser = SplitChooser::new();
            let mut splits = Vec::new();
            for _ in 0..2 * CYCLE_STEPS {
                chooser.start_step();
                let split = SPLITTING.get();
                splits.push(split);
                let step = splits.len() - 1;
                if split == whole_is_slower {
                    // The faster way: no time at all, but for one step of its first probe held
                    // up for longer than the slower way's eight steps together.
                    if step == 1 || step == PROBE_STEPS as usize + 1 {
                        thread::sleep(Duration::from_millis(20));
                    }
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
