//! Task parallelism for the fused matmuls, with the calling thread doing the work.
//!
//! A decode-sized matmul takes a few hundred microseconds. Handing it to a sleeping pool
//! thread (rayon's `install`) and sleeping until it is done costs two wake-ups per call, which
//! on a VM whose idle vCPUs halt is 0.1–0.7 ms, and next to torch's OpenMP threads (which spin
//! after every op) a pool thread may not run at all for a while. Here the calling thread
//! claims tasks from a shared counter right away; pool workers are asked to help and claim
//! tasks too once they wake. The caller waits only for tasks that were claimed, never for a
//! helper that has not started, so a call is never slower than running it on the caller
//! alone (plus a few atomics) and as fast as the pool when the workers are awake. A fork-join
//! [`Team`] (an OpenMP runtime's threads) can be used instead of a rayon pool.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A fork-join team of threads, such as an OpenMP runtime's: [`Team::run`] calls `f` once on
/// each of [`Team::size`] threads, the calling thread among them, and returns when every call
/// has returned. (The Python bindings run the fused matmuls on torch's OpenMP team, so they
/// share the threads torch's own ops use instead of competing with them.)
pub trait Team: Sync {
    fn size(&self) -> usize;
    fn run(&self, f: &(dyn Fn() + Sync));
}

/// Which threads run a fused matmul's tasks. The calling thread always works.
#[derive(Clone, Copy)]
pub enum Threads<'a> {
    /// The calling thread only.
    Single,
    /// The calling thread plus the workers of the current rayon pool (the global pool when
    /// called from outside any pool).
    Current,
    /// The calling thread plus the workers of `pool`.
    Pool(&'a rayon::ThreadPool),
    /// A fork-join team (the caller is one of its threads).
    Team(&'a dyn Team),
}

impl std::fmt::Debug for Threads<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threads::Single => write!(f, "Single"),
            Threads::Current => write!(f, "Current"),
            Threads::Pool(p) => write!(f, "Pool({})", p.current_num_threads()),
            Threads::Team(t) => write!(f, "Team({})", t.size()),
        }
    }
}

impl Threads<'_> {
    /// Helper jobs to ask for: the pool's size less one, as the caller works too (a call uses
    /// as many threads as the pool has, whether or not the caller is one of its workers).
    fn helpers(self) -> usize {
        match self {
            Threads::Single => 0,
            Threads::Current => rayon::current_num_threads().saturating_sub(1),
            Threads::Pool(p) => p.current_num_threads().saturating_sub(1),
            Threads::Team(t) => t.size().saturating_sub(1),
        }
    }

    /// Total threads that may work on a call (for sizing tasks).
    pub fn count(self) -> usize {
        self.helpers() + 1
    }

    fn spawn(self, job: impl FnOnce() + Send + 'static) {
        match self {
            Threads::Single | Threads::Team(_) => unreachable!("no helpers are spawned here"),
            Threads::Current => rayon::spawn(job),
            Threads::Pool(p) => p.spawn(job),
        }
    }
}

struct Shared {
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

/// `*const dyn Fn` with its lifetime erased, sendable to helpers. Dereferenced only between a
/// successful claim of a task and the increment of `done` for it (see [`for_tasks`]).
#[derive(Clone, Copy)]
struct TaskFn(*const (dyn Fn(usize) + Sync + 'static));

// SAFETY: the pointee is Sync; validity while in use is guaranteed by `for_tasks`.
unsafe impl Send for TaskFn {}

/// Claims and runs tasks until none are left (a panic is recorded in `shared`).
fn work(shared: &Shared, f: TaskFn, n: usize) {
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        // SAFETY: task i < n was claimed, so `for_tasks` has not returned and `f` is alive.
        let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*f.0)(i) }));
        if r.is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.done.fetch_add(1, Ordering::Release);
    }
}

/// Runs `f(i)` for every `i < n`, each exactly once, on the calling thread and on helpers of
/// `threads`; returns when all have finished (their writes visible to the caller). A panic in
/// a task is resumed on the caller after every claimed task has finished.
pub fn for_tasks(threads: Threads, n: usize, f: &(dyn Fn(usize) + Sync)) {
    let helpers = if n > 1 {
        threads.helpers().min(n - 1)
    } else {
        0
    };
    if helpers == 0 {
        (0..n).for_each(f);
        return;
    }
    if let Threads::Team(team) = threads {
        // Fork-join: every member has returned when `run` does, so nothing outlives `f`.
        let shared = Shared {
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        };
        let claim = || loop {
            let i = shared.next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
            }
            shared.done.fetch_add(1, Ordering::Release);
        };
        team.run(&claim);
        // A member the runtime did not start leaves tasks unclaimed: run them here.
        claim();
        if shared.panicked.load(Ordering::Relaxed) {
            resume_unwind(Box::new("a task of a fused matmul panicked"));
        }
        return;
    }
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    });
    // SAFETY: only the lifetime is erased (same fat-pointer layout). Helpers dereference the
    // pointer only after claiming a task below `n` and before counting it done, and this
    // function returns only once all `n` tasks are counted done; a helper that starts later
    // finds no task to claim and never touches it.
    let task = TaskFn(unsafe {
        std::mem::transmute::<
            *const (dyn Fn(usize) + Sync + '_),
            *const (dyn Fn(usize) + Sync + 'static),
        >(f as *const _)
    });
    for _ in 0..helpers {
        let s = Arc::clone(&shared);
        threads.spawn(move || work(&s, task, n));
    }
    work(&shared, task, n);
    let mut spins = 0u32;
    while shared.done.load(Ordering::Acquire) < n {
        // Only tasks already running on a helper are left: wait for them.
        if spins < 64 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
    if shared.panicked.load(Ordering::Relaxed) {
        resume_unwind(Box::new("a task of a fused matmul panicked"));
    }
}

/// Pointer to a slice being split into disjoint chunks across threads.
struct SlicePtr<T>(*mut T, usize);

// SAFETY: chunks handed to different tasks never overlap; T is Send.
unsafe impl<T: Send> Sync for SlicePtr<T> {}

/// `data.chunks_mut(chunk)` with `f(index, chunk)` run as tasks of [`for_tasks`].
pub fn par_chunks_mut<T: Send>(
    threads: Threads,
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let n = data.len().div_ceil(chunk);
    let base = SlicePtr(data.as_mut_ptr(), data.len());
    let base = &base;
    for_tasks(threads, n, &|i| {
        let start = i * chunk;
        let len = chunk.min(base.1 - start);
        // SAFETY: task i owns elements [start, start + len), disjoint from every other task's,
        // inside `data`, which outlives `for_tasks`.
        let part = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), len) };
        f(i, part)
    });
}

/// `a.chunks_mut(a_chunk)` and `b.chunks_mut(b_chunk)` in lockstep: `f(index, a_part,
/// b_part)` run as tasks of [`for_tasks`], one per chunk of `a`; `b`'s part is cut to its end
/// (empty past it).
pub fn par_chunks2_mut<A: Send, B: Send>(
    threads: Threads,
    a: &mut [A],
    a_chunk: usize,
    b: &mut [B],
    b_chunk: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (a_chunk, b_chunk) = (a_chunk.max(1), b_chunk.max(1));
    let n = a.len().div_ceil(a_chunk);
    let (pa, pb) = (
        SlicePtr(a.as_mut_ptr(), a.len()),
        SlicePtr(b.as_mut_ptr(), b.len()),
    );
    let (pa, pb) = (&pa, &pb);
    for_tasks(threads, n, &|i| {
        let a0 = i * a_chunk;
        let b0 = (i * b_chunk).min(pb.1);
        let (alen, blen) = (a_chunk.min(pa.1 - a0), b_chunk.min(pb.1 - b0));
        // SAFETY: task i owns elements [a0, a0 + alen) of `a` and [b0, b0 + blen) of `b`,
        // disjoint from every other task's, inside slices that outlive `for_tasks`.
        let (part_a, part_b) = unsafe {
            (
                std::slice::from_raw_parts_mut(pa.0.add(a0), alen),
                std::slice::from_raw_parts_mut(pb.0.add(b0), blen),
            )
        };
        f(i, part_a, part_b)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_once_on_every_kind_of_threads() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for threads in [Threads::Single, Threads::Current, Threads::Pool(&pool)] {
            for n in [0usize, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_tasks(threads, n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
            let mut v = vec![0usize; 1001];
            par_chunks_mut(threads, &mut v, 10, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    *x = i * 10 + j;
                }
            });
            assert!(v.iter().enumerate().all(|(i, &x)| x == i));
            let (mut a, mut b) = (vec![0usize; 95], vec![0usize; 19]);
            par_chunks2_mut(threads, &mut a, 10, &mut b, 2, |i, pa, pb| {
                pa.iter_mut().for_each(|x| *x = i + 1);
                pb.iter_mut().for_each(|x| *x = i + 1);
            });
            assert!(a.iter().enumerate().all(|(j, &x)| x == j / 10 + 1));
            assert!(b.iter().enumerate().all(|(j, &x)| x == j / 2 + 1));
        }
        // From inside the pool: the caller is one of its workers.
        pool.install(|| {
            let mut v = vec![0u8; 64];
            par_chunks_mut(Threads::Current, &mut v, 3, |_, c| c.fill(1));
            assert!(v.iter().all(|&x| x == 1));
        });
    }

    /// A team of scoped threads (what an OpenMP runtime provides).
    struct ScopedTeam(usize);

    impl Team for ScopedTeam {
        fn size(&self) -> usize {
            self.0
        }
        fn run(&self, f: &(dyn Fn() + Sync)) {
            std::thread::scope(|s| {
                for _ in 1..self.0 {
                    s.spawn(f);
                }
                f();
            });
        }
    }

    #[test]
    fn a_team_runs_every_task_once() {
        for size in [1usize, 2, 5] {
            let team = ScopedTeam(size);
            let hits: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
            for_tasks(Threads::Team(&team), 97, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            assert_eq!(Threads::Team(&team).count(), size);
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            for_tasks(Threads::Team(&ScopedTeam(3)), 10, &|i| assert_ne!(i, 4))
        }));
        assert!(r.is_err());
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_others() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let ran = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            for_tasks(Threads::Pool(&pool), 50, &|i| {
                ran.fetch_add(1, Ordering::Relaxed);
                if i == 7 {
                    panic!("task 7");
                }
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 50);
    }
}
