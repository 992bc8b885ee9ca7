//! The listener's drain signal: how every open connection learns that shutdown has begun,
//! and how the listener learns that the last one has closed.
//!
//! hyper-util's `GracefulShutdown` does this with a `watch` channel whose receiver polls a
//! `Notified` future — a mutex lock — every time its connection is polled, several times per
//! request. Here a connection's poll costs one atomic load while no shutdown is under way:
//! the lock is taken when a connection opens, when its task's waker is first seen, when it
//! closes, and once at shutdown to wake them all.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
};

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use slab::Slab;
use tokio::sync::Notify;

#[derive(Default)]
struct Shared {
    draining: AtomicBool,
    /// One entry per open connection: the waker of the task serving it, once it has one.
    conns: Mutex<Slab<Option<Waker>>>,
    /// Notified when the last connection closes after shutdown has begun.
    all_closed: Notify,
}

/// The listener's side: hands out a [`Watch`] per connection, then drains them.
#[derive(Default)]
pub struct Drain {
    shared: Arc<Shared>,
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Registers a connection: it counts as open until the returned watch is dropped.
    pub fn watch(&self) -> Watch {
        let key = self.shared.conns.lock().insert(None);
        Watch {
            shared: self.shared.clone(),
            key,
            waker: None,
        }
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// Tells every open connection to finish (see [`Watch::serve`]) and resolves when the
    /// last one has closed.
    pub async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        // Taken under the lock that registration also takes: a connection that stores its
        // waker after this reads `draining` afterwards and sees it set.
        let wakers: Vec<Waker> = (self.shared.conns.lock().iter_mut())
            .filter_map(|(_, waker)| waker.take())
            .collect();
        wakers.into_iter().for_each(Waker::wake);
        loop {
            let closed = self.shared.all_closed.notified();
            tokio::pin!(closed);
            // Enabled before the check, so a close between the check and the await wakes it.
            closed.as_mut().enable();
            if self.shared.conns.lock().is_empty() {
                return;
            }
            closed.await;
        }
    }
}

/// A connection's side of the drain.
pub struct Watch {
    shared: Arc<Shared>,
    key: usize,
    /// The waker last stored in `shared.conns`, to see without the lock that it is current.
    waker: Option<Waker>,
}

impl Watch {
    /// Whether shutdown has begun; if not, `cx`'s task is woken when it does.
    fn poll_draining(&mut self, cx: &mut Context<'_>) -> bool {
        if self.shared.draining.load(Ordering::Acquire) {
            return true;
        }
        // A task's waker does not change between polls: this branch runs once per task.
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            self.shared.conns.lock()[self.key] = Some(waker.clone());
            self.waker = Some(waker);
            // Shutdown may have begun, and taken the previous waker, since the load above.
            return self.shared.draining.load(Ordering::Acquire);
        }
        false
    }

    /// Resolves once shutdown has begun.
    pub async fn draining(&mut self) {
        std::future::poll_fn(|cx| match self.poll_draining(cx) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        })
        .await
    }

    /// Serves `conn` to its end. Once shutdown begins, `finish` is called on it once: hyper's
    /// `graceful_shutdown`, which closes an idle connection and lets in-flight requests and
    /// streams run to their end.
    pub fn serve<C: Future>(self, conn: C, finish: fn(Pin<&mut C>)) -> Serve<C> {
        Serve {
            conn,
            watch: self,
            finish: Some(finish),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut conns = self.shared.conns.lock();
        conns.remove(self.key);
        // Read under the lock: if `shutdown` sets the flag after this, its own check (under
        // the same lock) sees the connection gone.
        let last = conns.is_empty() && self.shared.draining.load(Ordering::Acquire);
        drop(conns);
        if last {
            self.shared.all_closed.notify_waiters();
        }
    }
}

pin_project! {
    /// A connection served under a [`Watch`]; see [`Watch::serve`].
    pub struct Serve<C> {
        #[pin]
        conn: C,
        watch: Watch,
        // Taken when called.
        finish: Option<fn(Pin<&mut C>)>,
    }
}

impl<C: Future> Future for Serve<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if this.finish.is_some() && this.watch.poll_draining(cx) {
            if let Some(finish) = this.finish.take() {
                finish(this.conn.as_mut());
            }
        }
        this.conn.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicUsize, time::Duration};

    use super::*;

    /// A stand-in connection: pending until `finish` is called, then done after `polls`
    /// more polls (an in-flight request that still has to run).
    struct Conn {
        finished: Arc<AtomicUsize>,
        left: Option<usize>,
    }

    impl Future for Conn {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            match self.left {
                Some(0) => Poll::Ready(()),
                Some(n) => {
                    self.left = Some(n - 1);
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Pending,
            }
        }
    }

    fn finish(mut conn: Pin<&mut Conn>) {
        conn.finished.fetch_add(1, Ordering::SeqCst);
        conn.left = Some(3);
    }

    #[tokio::test]
    async fn shutdown_finishes_every_connection_once_and_waits_for_the_last() {
        let drain = Drain::new();
        let finished = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let conn = Conn {
                    finished: finished.clone(),
                    left: None,
                };
                tokio::spawn(drain.watch().serve(conn, finish))
            })
            .collect();
        // Every task has polled its connection (and registered its waker) before shutdown.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(drain.open(), 5);
        assert_eq!(
            finished.load(Ordering::SeqCst),
            0,
            "finished before shutdown"
        );
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown())
            .await
            .expect("shutdown returns once every connection has closed");
        assert_eq!(finished.load(Ordering::SeqCst), 5);
        for task in tasks {
            task.await.expect("connection task");
        }
    }

    #[tokio::test]
    async fn shutdown_waits_for_a_connection_that_is_still_running() {
        let drain = Drain::new();
        let watch = drain.watch();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let conn = tokio::spawn(async move {
            let _watch = watch;
            let _ = released.await;
        });
        let mut shutdown = tokio::spawn(drain.shutdown());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut shutdown)
                .await
                .is_err(),
            "shutdown returned while a connection was open"
        );
        release.send(()).unwrap();
        conn.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("shutdown returns when the last connection closes")
            .unwrap();
    }

    #[tokio::test]
    async fn a_connection_waiting_for_its_first_bytes_hears_of_shutdown() {
        let drain = Drain::new();
        let mut waiting = drain.watch();
        let mut fresh = drain.watch();
        let task = tokio::spawn(async move { waiting.draining().await });
        tokio::task::yield_now().await;
        let shutdown = tokio::spawn(drain.shutdown());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("draining() resolves at shutdown")
            .unwrap();
        // One that never polled before shutdown sees it on its first poll.
        tokio::time::timeout(Duration::from_secs(5), fresh.draining())
            .await
            .expect("draining() resolves after shutdown began");
        drop(fresh);
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("shutdown returns")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_with_nothing_open_returns_at_once() {
        let drain = Drain::new();
        drop(drain.watch());
        assert_eq!(drain.open(), 0);
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown())
            .await
            .expect("nothing to wait for");
    }
}
