//! Self-clocked batches: the messages and leaves of every session of a node
//! go to Redis several to a script call. A batch goes as soon as the one
//! before it has been answered, with everything that arrived meanwhile, so
//! a quiet node sends each at once and a busy Redis gets more per wake-up.

use crate::wire::Reject;
use gateway_shared::protocol::ErrorCode;
use redis::RedisResult;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

/// How long a batch waits for the one before it to be answered: past it,
/// the batch goes anyway (pipelined behind it), so a stalled Redis (a cut
/// link, a failing-over master) delays the jobs behind it by at most this
/// much more than the stall itself.
const OVERLAP: Duration = Duration::from_millis(2);

/// Jobs one batch carries at most.
const MAX_BATCH: usize = 256;

pub(super) struct Batcher<J> {
    jobs: mpsc::Receiver<J>,
    /// Batches sent and not yet answered, oldest first.
    in_flight: VecDeque<JoinHandle<()>>,
    /// How long a batch also waits after its first job (0: not at all).
    window: Duration,
    /// Batches in flight at most: past it, the next waits for the oldest.
    max_in_flight: usize,
}

impl<J> Batcher<J> {
    pub(super) fn new(jobs: mpsc::Receiver<J>, window: Duration, max_in_flight: usize) -> Self {
        Self {
            jobs,
            in_flight: VecDeque::new(),
            window,
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// The next batch: a first job, then (once the batch in flight was
    /// answered, or after `OVERLAP`; and once fewer than `max_in_flight`
    /// are) every job waiting, and with a window those that arrive within
    /// it. `None` once every sender is gone.
    pub(super) async fn next(&mut self) -> Option<Vec<J>> {
        let first = self.jobs.recv().await?;
        self.in_flight.retain(|sent| !sent.is_finished());
        if let Some(newest) = self.in_flight.back_mut() {
            let _ = tokio::time::timeout(OVERLAP, newest).await;
        }
        // Before the wait for the oldest: a handle awaited to its end
        // above must not be awaited again.
        self.in_flight.retain(|sent| !sent.is_finished());
        while self.in_flight.len() >= self.max_in_flight {
            if let Some(oldest) = self.in_flight.pop_front() {
                let _ = oldest.await;
            }
        }
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + self.window;
        while batch.len() < MAX_BATCH {
            let next = if self.window.is_zero() {
                self.jobs.try_recv().ok()
            } else {
                tokio::time::timeout_at(deadline, self.jobs.recv())
                    .await
                    .ok()
                    .flatten()
            };
            match next {
                Some(job) => batch.push(job),
                None => break,
            }
        }
        Some(batch)
    }

    /// Sends a batch in a task of its own; the next batch waits for it.
    pub(super) fn send(&mut self, sending: impl Future<Output = ()> + Send + 'static) {
        self.in_flight.push_back(tokio::spawn(sending));
    }

    /// Sends a batch's groups, each with `call` (one script call, which
    /// answers the group's jobs), all at once in one task of their own.
    pub(super) fn send_each<G, F>(&mut self, groups: Vec<G>, call: impl Fn(G) -> F + Send + 'static)
    where
        G: Send + 'static,
        F: Future<Output = ()> + Send,
    {
        self.send(async move {
            futures_util::future::join_all(groups.into_iter().map(call)).await;
        });
    }
}

/// Queues the job `make` builds around its reply sender, and returns the
/// wait for that reply (to be run under the operation deadline).
pub(super) async fn submit<J, T>(
    queue: &mpsc::Sender<J>,
    make: impl FnOnce(oneshot::Sender<RedisResult<T>>) -> J,
) -> Result<impl Future<Output = RedisResult<T>>, Reject> {
    let (reply, replied) = oneshot::channel();
    queue
        .send(make(reply))
        .await
        .map_err(|_| Reject::new(ErrorCode::Unavailable, "node is shutting down"))?;
    Ok(async {
        replied
            .await
            .unwrap_or_else(|_| Err((redis::ErrorKind::Client, "batch task stopped").into()))
    })
}

/// The error a job of a batch is answered with: `what` failed, `why`.
pub(super) fn failed(what: &'static str, why: &str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, what, why.to_owned()))
}

/// Jobs queued that no caller waits for (the leaves of ended sessions):
/// a node that stops waits for them first, so that what it queued lands.
#[derive(Default)]
pub(super) struct Pending {
    count: AtomicUsize,
    none: Notify,
}

impl Pending {
    pub(super) fn add(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// `n` of them were answered (done or failed), or will never be.
    pub(super) fn done(&self, n: usize) {
        if n > 0 && self.count.fetch_sub(n, Ordering::SeqCst) == n {
            self.none.notify_waiters();
        }
    }

    /// Returns once none is pending.
    pub(super) async fn none(&self) {
        loop {
            let notified = self.none.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// `batch` split into groups of jobs for which `together` holds with the
/// group's first, in order of first appearance; each group keeps the
/// jobs' order.
pub(super) fn groups<J>(batch: Vec<J>, together: impl Fn(&J, &J) -> bool) -> Vec<Vec<J>> {
    let mut groups: Vec<Vec<J>> = Vec::new();
    for job in batch {
        match groups.iter_mut().find(|g| together(&g[0], &job)) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_first_appearance_and_order() {
        let g = groups(
            vec![(1, 'a'), (2, 'b'), (1, 'c'), (3, 'd'), (2, 'e')],
            |x, y| x.0 == y.0,
        );
        assert_eq!(
            g,
            vec![
                vec![(1, 'a'), (1, 'c')],
                vec![(2, 'b'), (2, 'e')],
                vec![(3, 'd')]
            ]
        );
    }

    #[tokio::test]
    async fn a_batch_takes_what_arrives_while_the_one_before_is_at_redis() {
        let (tx, rx) = mpsc::channel(16);
        let mut batcher = Batcher::new(rx, Duration::ZERO, usize::MAX);
        tx.send(1).await.unwrap();
        assert_eq!(batcher.next().await, Some(vec![1]));
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        batcher.send(async move {
            let _ = answered.await;
        });
        // 2 waits; 3 arrives while the batch of 1 is still unanswered, and
        // only then is it answered: 2 and 3 go together.
        tx.send(2).await.unwrap();
        let later = tx.clone();
        tokio::spawn(async move {
            later.send(3).await.unwrap();
            answer.send(()).unwrap();
        });
        assert_eq!(batcher.next().await, Some(vec![2, 3]));
        drop(tx);
        assert_eq!(batcher.next().await, None);
    }

    #[tokio::test]
    async fn a_batch_goes_even_if_the_one_before_is_never_answered() {
        let (tx, rx) = mpsc::channel(16);
        let mut batcher = Batcher::new(rx, Duration::ZERO, usize::MAX);
        tx.send(1).await.unwrap();
        assert_eq!(batcher.next().await, Some(vec![1]));
        batcher.send(std::future::pending());
        tx.send(2).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), batcher.next()).await;
        assert_eq!(
            next.expect("not held behind a stalled batch"),
            Some(vec![2])
        );
    }

    #[tokio::test]
    async fn no_more_batches_are_in_flight_than_the_limit() {
        let (tx, rx) = mpsc::channel(16);
        let mut batcher = Batcher::new(rx, Duration::ZERO, 2);
        let (answer_first, first_answered) = tokio::sync::oneshot::channel::<()>();
        tx.send(1).await.unwrap();
        assert_eq!(batcher.next().await, Some(vec![1]));
        batcher.send(async move {
            let _ = first_answered.await;
        });
        tx.send(2).await.unwrap();
        assert_eq!(batcher.next().await, Some(vec![2]));
        batcher.send(std::future::pending());
        // Two unanswered: the third batch waits for the oldest, however
        // long; without the limit it would go after OVERLAP (2 ms).
        tx.send(3).await.unwrap();
        let mut third = Box::pin(batcher.next());
        assert!(tokio::time::timeout(100 * OVERLAP, &mut third)
            .await
            .is_err());
        answer_first.send(()).unwrap();
        assert_eq!(third.await, Some(vec![3]));
    }

    #[tokio::test]
    async fn with_one_in_flight_each_batch_waits_for_the_last() {
        let (tx, rx) = mpsc::channel(16);
        let mut batcher = Batcher::new(rx, Duration::ZERO, 1);
        for i in 1..=3 {
            tx.send(i).await.unwrap();
            assert_eq!(batcher.next().await, Some(vec![i]));
            batcher.send(async {});
        }
    }
}
