//! The event log of one deployment.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, ready};
use tokio::sync::watch;

use crate::model::Update;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error(
        "sequence {requested} is no longer held (history is bounded by the retention setting); the oldest held is {oldest}"
    )]
    OutOfRange { requested: u64, oldest: u64 },
    #[error(
        "after_sequence {after} is beyond the last update of this ended deployment; its last sequence is {last}"
    )]
    Beyond { after: u64, last: u64 },
}

/// Where the start of a bounded log can be read back from once it has left memory
/// (the store). Everything appended was handed to it before it was appended here.
pub(crate) trait Backfill: Send + Sync + 'static {
    /// Up to `max` updates with a sequence above `after`, in order.
    fn read(
        &self,
        after: u64,
        max: usize,
    ) -> BoxFuture<'static, Result<Vec<Arc<Update>>, LogError>>;
}

/// Every update of one deployment, in sequence order. One writer (the deployment's
/// task) appends; any number of readers replay and follow it, each at its own pace.
/// A bounded log holds only its last `max_held` updates in memory; readers behind
/// that read the earlier ones from its [`Backfill`].
pub struct DeploymentLog {
    inner: Mutex<Inner>,
    last: watch::Sender<u64>,
    max_held: usize,
    backfill: Option<Arc<dyn Backfill>>,
}

impl std::fmt::Debug for DeploymentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeploymentLog")
            .field("last_sequence", &*self.last.borrow())
            .field("max_held", &self.max_held)
            .finish_non_exhaustive()
    }
}

struct Inner {
    updates: VecDeque<Arc<Update>>,
    /// Sequence of `updates[0]` (1 until anything is evicted).
    first_seq: u64,
    closed: bool,
}

impl Default for DeploymentLog {
    fn default() -> Self {
        Self::new()
    }
}

impl DeploymentLog {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                updates: VecDeque::new(),
                first_seq: 1,
                closed: false,
            }),
            last: watch::Sender::new(0),
            max_held: usize::MAX,
            backfill: None,
        }
    }

    /// A log that keeps at most `max_held` updates in memory; earlier ones are read
    /// from `backfill`.
    pub(crate) fn bounded(max_held: usize, backfill: Arc<dyn Backfill>) -> Self {
        Self {
            max_held: max_held.max(1),
            backfill: Some(backfill),
            ..Self::new()
        }
    }

    /// Builds a log from updates loaded from the store (a finished deployment).
    pub(crate) fn from_updates(updates: Vec<Update>, closed: bool) -> Self {
        let first_seq = updates.first().map_or(1, |u| u.sequence);
        let last = updates.last().map_or(0, |u| u.sequence);
        Self {
            inner: Mutex::new(Inner {
                updates: updates.into_iter().map(Arc::new).collect(),
                first_seq,
                closed,
            }),
            last: watch::Sender::new(last),
            max_held: usize::MAX,
            backfill: None,
        }
    }

    /// An empty log whose next update is `after + 1` (continuing a stored one).
    pub(crate) fn resumed(after: u64) -> Self {
        Self::new().starting_after(after)
    }

    /// A bounded log (see [`DeploymentLog::bounded`]) whose next update is `after + 1`:
    /// a reader from an earlier sequence reads the stored updates from `backfill`, then
    /// follows the new ones.
    pub(crate) fn resumed_bounded(
        after: u64,
        max_held: usize,
        backfill: Arc<dyn Backfill>,
    ) -> Self {
        Self::bounded(max_held, backfill).starting_after(after)
    }

    fn starting_after(self, after: u64) -> Self {
        self.inner.lock().expect("log lock").first_seq = after + 1;
        self.last.send_replace(after);
        self
    }

    /// Sequence of the last update appended (0 when empty).
    pub(crate) fn last_sequence(&self) -> u64 {
        *self.last.borrow()
    }

    /// Appends the next update. Its `sequence` must follow the last one; an update
    /// that ends the deployment closes the log. Never waits on readers.
    #[cfg(test)]
    pub(crate) fn append(&self, update: Update) -> Arc<Update> {
        let update = Arc::new(update);
        self.append_shared(update.clone());
        update
    }

    /// Appends the next update, already shared (e.g. with the store). Its `sequence`
    /// must follow the last one; an update that ends the deployment closes the log.
    pub fn append_shared(&self, update: Arc<Update>) {
        {
            let mut inner = self.inner.lock().expect("log lock");
            let expected = inner.first_seq + inner.updates.len() as u64;
            assert_eq!(update.sequence, expected, "log sequence gap");
            assert!(!inner.closed, "append to a closed log");
            inner.closed = update.is_terminal();
            inner.updates.push_back(update.clone());
            while inner.updates.len() > self.max_held {
                inner.updates.pop_front();
                inner.first_seq += 1;
            }
        }
        self.last.send_replace(update.sequence);
    }

    /// All updates currently held.
    #[cfg(test)]
    fn snapshot(&self) -> Vec<Arc<Update>> {
        self.inner
            .lock()
            .expect("log lock")
            .updates
            .iter()
            .cloned()
            .collect()
    }

    /// Up to `max` updates with a sequence above `after`, and whether the log is closed.
    fn read_after(&self, after: u64, max: usize) -> Result<(Vec<Arc<Update>>, bool), LogError> {
        let inner = self.inner.lock().expect("log lock");
        if after + 1 < inner.first_seq {
            return Err(LogError::OutOfRange {
                requested: after + 1,
                oldest: inner.first_seq,
            });
        }
        let skip = (after + 1 - inner.first_seq) as usize;
        let batch = inner.updates.iter().skip(skip).take(max).cloned().collect();
        Ok((batch, inner.closed))
    }

    /// Replays every update with `sequence > after`, then follows live until the
    /// terminal update. Fails at once when `after + 1` is older than what is held.
    pub fn subscribe(self: &Arc<Self>, after: u64) -> Result<UpdateStream, LogError> {
        let last = self.last_sequence();
        if after > last && self.inner.lock().expect("log lock").closed {
            // Nothing will ever come: an empty stream would pass for success.
            return Err(LogError::Beyond { after, last });
        }
        if self.backfill.is_none() {
            self.read_after(after, 0)?;
        }
        let reader = Reader {
            log: self.clone(),
            cursor: after,
            pending: VecDeque::new(),
            done: false,
        };
        let updates = futures_util::stream::unfold(reader, |mut reader| async move {
            let next = reader.next().await?;
            Some((next, reader))
        });
        Ok(UpdateStream {
            updates: Box::pin(updates),
            cursor: after,
        })
    }
}

/// A subscriber's view of a [`DeploymentLog`]: a stream that ends after the terminal
/// update. Holds at most one batch of `Arc`s; a reader that falls behind simply reads
/// from the log when it catches up.
pub struct UpdateStream {
    updates: BoxStream<'static, Result<Arc<Update>, LogError>>,
    cursor: u64,
}

const BATCH: usize = 256;

impl std::fmt::Debug for UpdateStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateStream")
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl UpdateStream {
    /// Sequence of the last update this stream yielded (where to resume from).
    pub(crate) fn cursor(&self) -> u64 {
        self.cursor
    }
}

impl Stream for UpdateStream {
    type Item = Result<Arc<Update>, LogError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = ready!(self.updates.poll_next_unpin(cx));
        if let Some(Ok(update)) = &next {
            self.cursor = update.sequence;
        }
        Poll::Ready(next)
    }
}

/// The state behind an [`UpdateStream`].
struct Reader {
    log: Arc<DeploymentLog>,
    cursor: u64,
    pending: VecDeque<Arc<Update>>,
    done: bool,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<Arc<Update>, LogError>> {
        loop {
            if let Some(update) = self.pending.pop_front() {
                self.cursor = update.sequence;
                if update.is_terminal() {
                    self.done = true;
                    self.pending.clear();
                }
                return Some(Ok(update));
            }
            if self.done {
                return None;
            }
            // Subscribe to changes before reading, so an append between the read and
            // the wait is never missed.
            let mut changes = self.log.last.subscribe();
            changes.mark_unchanged();
            let read = self.log.read_after(self.cursor, BATCH);
            match read {
                Err(e) => match self.log.backfill.clone() {
                    Some(backfill) => {
                        let batch = backfill.read(self.cursor, BATCH).await;
                        if let Err(e) = self.take(batch) {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                    None => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
                Ok((batch, closed)) if batch.is_empty() => {
                    if closed {
                        self.done = true;
                        return None;
                    }
                    let _ = changes.changed().await;
                }
                Ok((batch, _)) => self.pending.extend(batch),
            }
        }
    }

    /// Takes a batch read back from the store; an empty one means the updates after
    /// the cursor are gone.
    fn take(&mut self, batch: Result<Vec<Arc<Update>>, LogError>) -> Result<(), LogError> {
        let batch = batch?;
        if batch.is_empty() {
            return Err(LogError::OutOfRange {
                requested: self.cursor + 1,
                oldest: self.log.inner.lock().expect("log lock").first_seq,
            });
        }
        self.pending.extend(batch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use futures_util::StreamExt;

    fn update(seq: u64, terminal: bool) -> Update {
        Update::for_test(seq, terminal)
    }

    /// Runs a reader on a thread of its own and waits 10 s for it: a reader that
    /// waits forever (a lost update, a log that never closes) or spins without ever
    /// yielding (a read loop that makes no progress) fails the test instead of hanging
    /// the suite. (A timeout on the test's own runtime cannot fire while a task on it
    /// spins.)
    async fn within_10s<T: Send + 'static>(
        what: &str,
        reader: impl Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let _ = tx.send(rt.block_on(reader));
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), rx)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
            .unwrap_or_else(|_| panic!("{what}: the reader panicked"))
    }

    /// The sequences a stream yields until it ends; fails instead of hanging when it
    /// does not end.
    async fn sequences(stream: UpdateStream) -> Vec<u64> {
        let all = stream.map(|u| u.unwrap().sequence).collect();
        within_10s("the stream did not end", all).await
    }

    #[tokio::test]
    async fn replays_then_follows_until_terminal() {
        let log = Arc::new(DeploymentLog::new());
        for s in 1..=3 {
            log.append(update(s, false));
        }
        let stream = log.subscribe(1).unwrap();
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for s in 4..=600 {
                    log.append(update(s, false));
                    if s % 100 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                log.append(update(601, true));
            })
        };
        let seqs = sequences(stream).await;
        writer.await.unwrap();
        assert_eq!(seqs, (2..=601).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn finished_log_replays_and_ends() {
        let log = Arc::new(DeploymentLog::new());
        log.append(update(1, false));
        log.append(update(2, true));
        assert_eq!(sequences(log.subscribe(0).unwrap()).await, vec![1, 2]);
        assert!(sequences(log.subscribe(2).unwrap()).await.is_empty());
    }

    struct Memory(Vec<Arc<Update>>);

    impl Backfill for Memory {
        fn read(
            &self,
            after: u64,
            max: usize,
        ) -> BoxFuture<'static, Result<Vec<Arc<Update>>, LogError>> {
            let batch: Vec<_> = self
                .0
                .iter()
                .filter(|u| u.sequence > after)
                .take(max)
                .cloned()
                .collect();
            Box::pin(async move { Ok(batch) })
        }
    }

    #[tokio::test]
    async fn a_bounded_log_reads_its_start_back_from_the_backfill() {
        let all: Vec<Arc<Update>> = (1..=1000).map(|s| Arc::new(update(s, s == 1000))).collect();
        let log = Arc::new(DeploymentLog::bounded(10, Arc::new(Memory(all.clone()))));
        let early = log.subscribe(0).unwrap();
        for u in &all[..995] {
            log.append_shared(u.clone());
        }
        assert_eq!(log.snapshot().len(), 10, "memory holds the last 10 only");
        let late = log.subscribe(500).unwrap();
        for u in &all[995..] {
            log.append_shared(u.clone());
        }
        let seqs = sequences(early).await;
        assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
        let seqs = sequences(late).await;
        assert_eq!(seqs, (501..=1000).collect::<Vec<_>>());
    }

    /// A log resumed after a restart continues the stored sequence: the next update
    /// is `after + 1`, and what came before is not in memory.
    #[tokio::test]
    async fn a_resumed_log_continues_after_the_stored_sequence() {
        let log = Arc::new(DeploymentLog::resumed(41));
        assert_eq!(log.last_sequence(), 41);
        let stream = log.subscribe(41).unwrap();
        log.append(update(42, false));
        log.append(update(43, true));
        let seqs = sequences(stream).await;
        assert_eq!(seqs, vec![42, 43]);
        assert_eq!(
            log.subscribe(40).err(),
            Some(LogError::OutOfRange {
                requested: 41,
                oldest: 42
            })
        );
    }

    /// The cursor says where to resume: the `after` subscribed with until something
    /// is yielded, then the last sequence yielded.
    #[tokio::test]
    async fn the_cursor_is_where_to_resume() {
        let log = Arc::new(DeploymentLog::new());
        for s in 1..=5 {
            log.append(update(s, false));
        }
        let mut stream = log.subscribe(3).unwrap();
        assert_eq!(stream.cursor(), 3);
        let (next, cursor) = within_10s("an update already in the log", async move {
            let next = stream.next().await;
            (next, stream.cursor())
        })
        .await;
        assert_eq!(next.unwrap().unwrap().sequence, 4);
        assert_eq!(cursor, 4);
    }

    /// A reader behind a bounded log whose backfill no longer has the updates it
    /// needs (retention removed them) gets OUT_OF_RANGE naming the first one missing
    /// and the oldest still held, and its stream ends.
    #[tokio::test]
    async fn a_backfill_that_lost_the_updates_ends_the_stream_out_of_range() {
        let log = Arc::new(DeploymentLog::bounded(2, Arc::new(Memory(Vec::new()))));
        for s in 1..=4 {
            log.append(update(s, false));
        }
        let mut stream = log.subscribe(1).unwrap();
        let (first, then) = within_10s(
            "the reader gives up instead of asking the backfill forever",
            async move {
                let first = stream.next().await;
                (first, stream.next().await.is_none())
            },
        )
        .await;
        assert_eq!(
            first.unwrap().err(),
            Some(LogError::OutOfRange {
                requested: 2,
                oldest: 3
            })
        );
        assert!(then, "the stream ends after the error");
    }

    #[tokio::test]
    async fn out_of_range_names_the_oldest() {
        let log = Arc::new(DeploymentLog::from_updates(
            vec![update(5, false), update(6, true)],
            true,
        ));
        assert_eq!(
            log.subscribe(2).err(),
            Some(LogError::OutOfRange {
                requested: 3,
                oldest: 5
            })
        );
        assert!(log.subscribe(4).is_ok());
    }
}
