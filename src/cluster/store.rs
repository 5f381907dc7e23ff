//! Durable Raft storage: the log, the vote and the committed log id in one redb database
//! (`<dir>/raft.redb`), the current snapshot in another (`<dir>/raft-snapshot.redb`), and the
//! state machine held in memory.
//!
//! Why this shape:
//! - The state machine (`ClusterState`) is small, so it lives in memory and is persisted only as
//!   snapshots. On restart it is loaded from the last snapshot, and openraft re-applies the log
//!   entries up to the persisted committed log id (`save_committed`/`read_committed`), so a node
//!   comes back with every change it had applied — without an fsync per apply.
//! - Every write that openraft relies on for safety (log append, truncate, purge, vote, snapshot)
//!   is a redb transaction committed with `Durability::Immediate` (fsync) before it is reported
//!   done: an acknowledged entry or vote survives `kill -9` or power loss.
//! - redb is synchronous; write transactions (which fsync) run on tokio's blocking pool so the
//!   Raft core task's worker thread is not stalled by disk latency. Reads are served inline: they
//!   touch no fsync and redb's reads are MVCC snapshots that never wait for a writer.
//! - The snapshot has a database of its own: redb has one writer per database, and Raft's core
//!   waits for its log appends, votes and committed ids. Written into the log's database, a
//!   snapshot of 100 000 policies (~11 MB, 100–190 ms on a busy disk) held those back: votes
//!   and committed ids waited 127–194 ms for the writer while three nodes loaded that many.

use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::events::EventLog;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::codec::{from_store, to_store};
use super::{ClusterState, Command, CommandResponse, Member, NodeId, TypeConfig};

/// Log entries, keyed by index; values are JSON-serialized `Entry<TypeConfig>`. The u64 key keeps
/// entries in index order, so range reads, truncation and purging are B-tree range operations.
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Small singleton values, JSON-serialized, under the `KEY_*` keys below.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// The current snapshot: its `SnapshotMeta` under `KEY_SNAP_META`, its bytes under
/// `KEY_SNAP_DATA`. Always written together in one transaction, so they never disagree.
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
/// The daemon start counter (the lease protocol's epoch).
const KEY_EPOCH: &str = "epoch";
const KEY_SNAP_META: &str = "meta";
const KEY_SNAP_DATA: &str = "data";

/// File name of the database inside the store directory.
pub const DB_FILE: &str = "raft.redb";
/// File name of the snapshot's database (stores written before it kept the snapshot in
/// [`DB_FILE`]; it moves on the first open).
pub const SNAP_FILE: &str = "raft-snapshot.redb";
const CACHE_BYTES: usize = 4 << 20;

type StorageResult<T> = Result<T, StorageError<NodeId>>;
type Meta = SnapshotMeta<NodeId, Member>;
type Membership = StoredMembership<NodeId, Member>;

/// Failure to open the store at start-up. The daemon cannot run without it, so each variant
/// names the path involved to make the log line actionable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating Raft store directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("opening Raft database {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("initialising Raft database {path}: {source}")]
    Init { path: PathBuf, source: DbError },
    #[error("loading the persisted snapshot from {path}: {source}")]
    LoadSnapshot { path: PathBuf, source: DbError },
}

/// A failed database operation (redb or decoding). Converted into openraft's `StorageError` at
/// the trait boundary, which tells openraft what was being done (read log, write vote, ...).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Redb(#[from] redb::Error),
    #[error("{0}")]
    Codec(#[from] super::codec::CodecError),
    #[error("storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

// `?` applies one `From`; redb returns a different error type per operation, so route each
// through `redb::Error`.
macro_rules! redb_into_db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                DbError::Redb(e.into())
            }
        }
    )*};
}
redb_into_db_error!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn any(e: DbError) -> AnyError {
    AnyError::new(&e)
}

/// The shared database handle. One per store directory: redb locks the file, so the log store
/// and the state machine share it rather than opening it twice.
struct Db {
    db: Database,
    /// The current snapshot (`SNAPSHOT`), in a database of its own.
    snaps: Database,
}

impl Db {
    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, DbError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        match table.get(key)? {
            Some(v) => Ok(Some(from_store(v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes one META value durably (fsync before returning).
    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), DbError> {
        let bytes = to_store(value)?;
        let started = Instant::now();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(META)?;
            table.insert(key, bytes.as_slice())?;
        }
        commit(txn, key, bytes.len(), started)
    }

    fn log_state(&self) -> Result<LogState<TypeConfig>, DbError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let last_purged: Option<LogId<NodeId>> = match meta.get(KEY_LAST_PURGED)? {
            Some(v) => Some(from_store(v.value())?),
            None => None,
        };
        let logs = txn.open_table(LOGS)?;
        let last_log = match logs.last()? {
            Some((_, v)) => Some(from_store::<Entry<TypeConfig>>(v.value())?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            // No entries left (all purged): openraft expects the purged id here.
            last_log_id: last_log.or(last_purged),
        })
    }

    fn entries(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, DbError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read()?;
        let logs = txn.open_table(LOGS)?;
        let mut out = Vec::new();
        for item in logs.range::<u64>((start, end))? {
            let (_, v) = item?;
            out.push(from_store(v.value())?);
        }
        Ok(out)
    }

    /// Appends entries in one transaction, durably. An entry at an existing index replaces it
    /// (openraft truncates conflicts first, so this only makes re-delivery idempotent).
    fn append(&self, entries: &[Entry<TypeConfig>]) -> Result<(), DbError> {
        let encoded = entries
            .iter()
            .map(|e| Ok((e.log_id.index, to_store(e)?)))
            .collect::<Result<Vec<_>, DbError>>()?;
        let bytes = encoded.iter().map(|(_, b)| b.len()).sum();
        let started = Instant::now();
        let txn = self.db.begin_write()?;
        {
            let mut logs = txn.open_table(LOGS)?;
            for (index, bytes) in &encoded {
                logs.insert(*index, bytes.as_slice())?;
            }
        }
        commit(txn, "append", bytes, started)
    }

    /// Deletes entries with index >= `from`.
    fn truncate(&self, from: u64) -> Result<(), DbError> {
        let started = Instant::now();
        let txn = self.db.begin_write()?;
        {
            let mut logs = txn.open_table(LOGS)?;
            logs.retain_in(from.., |_, _| false)?;
        }
        commit(txn, "truncate", 0, started)
    }

    /// Records `upto` as purged and deletes entries with index <= `upto.index`, atomically, so a
    /// crash can never leave the purged id behind the entries actually present (no hole).
    fn purge(&self, upto: LogId<NodeId>) -> Result<(), DbError> {
        let started = Instant::now();
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let previous: Option<LogId<NodeId>> = match meta.get(KEY_LAST_PURGED)? {
                Some(v) => Some(from_store(v.value())?),
                None => None,
            };
            // openraft purges monotonically; never let the recorded id move backwards anyway.
            if previous.as_ref().is_none_or(|p| *p < upto) {
                let bytes = to_store(&upto)?;
                meta.insert(KEY_LAST_PURGED, bytes.as_slice())?;
            }
            let mut logs = txn.open_table(LOGS)?;
            logs.retain_in(..=upto.index, |_, _| false)?;
        }
        commit(txn, "purge", 0, started)
    }

    /// A store written before the snapshot had its own database holds it in the log's: moved
    /// (durably, the copy first) on the first open.
    fn move_old_snapshot(&self) -> Result<(), DbError> {
        let (meta, data) = {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            let (Some(m), Some(d)) = (table.get(KEY_SNAP_META)?, table.get(KEY_SNAP_DATA)?) else {
                return Ok(());
            };
            (from_store::<Meta>(m.value())?, d.value().to_vec())
        };
        self.put_snapshot(&meta, &data, true)?;
        let started = Instant::now();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(SNAPSHOT)?;
            table.remove(KEY_SNAP_META)?;
            table.remove(KEY_SNAP_DATA)?;
        }
        commit(txn, "moving the snapshot", 0, started)
    }

    fn snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>, DbError> {
        let txn = self.snaps.begin_read()?;
        let table = txn.open_table(SNAPSHOT)?;
        let meta = table.get(KEY_SNAP_META)?;
        let data = table.get(KEY_SNAP_DATA)?;
        match (meta, data) {
            (Some(m), Some(d)) => Ok(Some((from_store(m.value())?, d.value().to_vec()))),
            _ => Ok(None),
        }
    }

    /// Stores a snapshot durably, replacing the current one. With `only_if_newer`, a snapshot
    /// older than the stored one is dropped: a snapshot build that raced with an installed
    /// (newer) snapshot from the leader must not overwrite it.
    fn put_snapshot(&self, meta: &Meta, data: &[u8], only_if_newer: bool) -> Result<(), DbError> {
        let meta_bytes = to_store(meta)?;
        let started = Instant::now();
        let txn = self.snaps.begin_write()?;
        {
            let mut table = txn.open_table(SNAPSHOT)?;
            if only_if_newer && let Some(cur) = table.get(KEY_SNAP_META)? {
                let cur: Meta = from_store(cur.value())?;
                if cur.last_log_id > meta.last_log_id {
                    return Ok(());
                }
            }
            table.insert(KEY_SNAP_META, meta_bytes.as_slice())?;
            table.insert(KEY_SNAP_DATA, data)?;
        }
        commit(txn, "snapshot", data.len(), started)
    }
}

/// A write that took longer than this (waiting for the writer, and the commit's fsync) is
/// logged: Raft's core waits for log writes, so a slow disk delays heartbeats and votes.
const SLOW_WRITE: Duration = Duration::from_millis(100);

/// Commits `txn` (durably), warning when the write begun at `started` was slow.
fn commit(
    txn: WriteTransaction,
    what: &str,
    bytes: usize,
    started: Instant,
) -> Result<(), DbError> {
    let waited = started.elapsed();
    txn.commit()?;
    let took = started.elapsed();
    tracing::debug!(
        write = what,
        bytes,
        waited_for_writer_ms = waited.as_secs_f64() * 1e3,
        took_ms = took.as_secs_f64() * 1e3,
        "store write"
    );
    if took >= SLOW_WRITE {
        tracing::warn!(
            write = what,
            bytes,
            waited_for_writer_ms = waited.as_millis() as u64,
            took_ms = took.as_millis() as u64,
            "slow store write: the disk delays the Raft log (and with it heartbeats and votes)"
        );
    }
    Ok(())
}

fn range_is_empty(start: Bound<u64>, end: Bound<u64>) -> bool {
    let lo = match start {
        Bound::Included(s) => s,
        Bound::Excluded(s) => match s.checked_add(1) {
            Some(s) => s,
            None => return true,
        },
        Bound::Unbounded => 0,
    };
    match end {
        Bound::Included(e) => lo > e,
        Bound::Excluded(e) => lo >= e,
        Bound::Unbounded => false,
    }
}

/// Runs a blocking database write off the async worker threads.
async fn blocking<T, F>(f: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, DbError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

/// Opens (creating if needed) the database in `dir`, with its tables.
fn open_db(dir: &Path) -> Result<Arc<Db>, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(DB_FILE);
    let snap_path = dir.join(SNAP_FILE);
    // The log is read back only after a restart or for a lagging follower; a small cache keeps
    // an idle node's memory down (redb's default is 1 GiB).
    let create = |path: &Path| {
        redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })
    };
    let db = Db {
        db: create(&path)?,
        snaps: create(&snap_path)?,
    };
    // Create the tables up front so read transactions can always open them; the log's database
    // keeps an (empty) snapshot table for `move_old_snapshot`.
    let init = |path: &Path, step: &dyn Fn() -> Result<(), DbError>| {
        step().map_err(|source| StoreError::Init {
            path: path.to_path_buf(),
            source,
        })
    };
    init(&path, &|| {
        let txn = db.db.begin_write()?;
        txn.open_table(LOGS)?;
        txn.open_table(META)?;
        txn.open_table(SNAPSHOT)?;
        Ok(txn.commit()?)
    })?;
    init(&snap_path, &|| {
        let txn = db.snaps.begin_write()?;
        txn.open_table(SNAPSHOT)?;
        Ok(txn.commit()?)
    })?;
    init(&path, &|| db.move_old_snapshot())?;
    Ok(Arc::new(db))
}

/// The state machine as of the persisted snapshot.
fn load_snapshot(db: &Db) -> Result<SmData, DbError> {
    Ok(match db.snapshot()? {
        Some((meta, data)) => {
            let payload: SnapshotPayload = from_store(&data)?;
            SmData {
                state: Arc::new(payload.state),
                last_applied: meta.last_log_id,
                membership: meta.last_membership,
                bulk: 0,
                staging: false,
            }
        }
        None => SmData::default(),
    })
}

/// What a starting daemon needs before anything else, read from the store in `dir` and closed
/// again: a new epoch for its lease reports (bumped durably, so that every start has a higher
/// one), and the last committed state (the snapshot with the committed log entries after it
/// applied), whose gateways' addresses the fence must cover at once.
pub fn startup(dir: &Path) -> Result<(u64, ClusterState), StoreError> {
    let db = open_db(dir)?;
    let path = dir.join(DB_FILE);
    let read = || -> Result<(u64, ClusterState), DbError> {
        let epoch = db.get_meta::<u64>(KEY_EPOCH)?.unwrap_or(0) + 1;
        db.put_meta(KEY_EPOCH, &epoch)?;
        let data = load_snapshot(&db)?;
        let mut state = (*data.state).clone();
        let from = data.last_applied.map_or(0, |l| l.index + 1);
        let committed: Option<LogId<NodeId>> = db
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten();
        if let Some(c) = committed
            && c.index >= from
        {
            for e in db.entries(Bound::Included(from), Bound::Included(c.index))? {
                if let EntryPayload::Normal(super::codec::Versioned(cmd)) = e.payload {
                    state.apply(&cmd);
                }
            }
        }
        Ok((epoch, state))
    };
    read().map_err(|source| StoreError::LoadSnapshot { path, source })
}

/// Opens (creating if needed) the store in `dir` and loads the state machine from the persisted
/// snapshot, if any. Returns the two halves openraft wants; they share one database handle.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let db = open_db(dir)?;
    let data = load_snapshot(&db).map_err(|source| StoreError::LoadSnapshot {
        path: dir.join(DB_FILE),
        source,
    })?;
    let (tx, _) = watch::channel(data.applied());
    let sm = StateMachineStore {
        inner: Arc::new(SmInner {
            db: db.clone(),
            data: Mutex::new(data),
            tx,
            events: EventLog::default(),
        }),
    };
    Ok((LogStore { db }, sm))
}

/// The Raft log and vote. Cheap to clone; clones share the database (openraft's log readers for
/// replication are clones).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.db
            .entries(range.start_bound().cloned(), range.end_bound().cloned())
            .map_err(|e| StorageIOError::read_logs(any(e)).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        self.db
            .log_state()
            .map_err(|e| StorageIOError::read_logs(any(e)).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let db = self.db.clone();
        let vote = *vote;
        blocking(move || db.put_meta(KEY_VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(any(e)).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.db
            .get_meta(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(any(e)).into())
    }

    /// Persisted (durably) so that a restarted node re-applies everything it had committed
    /// before it exits `get_initial_state`, instead of starting from the last snapshot's state.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let db = self.db.clone();
        blocking(move || db.put_meta(KEY_COMMITTED, &committed))
            .await
            .map_err(|e| StorageIOError::write(any(e)).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        self.db
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)
            .map(Option::flatten)
            .map_err(|e| StorageIOError::read(any(e)).into())
    }

    /// Writes and fsyncs the entries, and only then reports them flushed: openraft counts a
    /// flushed entry towards the commit quorum, so reporting earlier could lose a committed
    /// write on a crash.
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let db = self.db.clone();
        match blocking(move || db.append(&entries)).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(any(e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let db = self.db.clone();
        blocking(move || db.truncate(log_id.index))
            .await
            .map_err(|e| StorageIOError::write_logs(any(e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let db = self.db.clone();
        blocking(move || db.purge(log_id))
            .await
            .map_err(|e| StorageIOError::write_logs(any(e)).into())
    }
}

/// What the daemon sees of the state machine: the state after the last applied entry.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Index of the last applied log entry; 0 also before anything was applied (entry 0 is the
    /// cluster's initial membership, which changes no `ClusterState`).
    pub index: u64,
    /// The term of the leader that wrote the last applied entry (0 before any).
    pub term: u64,
    pub state: Arc<ClusterState>,
    pub membership: StoredMembership<NodeId, Member>,
    /// The log since the last snapshot carries many objects (a seed, a large apply): a
    /// snapshot should compact it (see `ClusterNode::run_compaction`).
    pub compact: bool,
}

/// The snapshot's bytes: self-describing, so the state can be checked against the meta.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    state: ClusterState,
}

#[derive(Default)]
struct SmData {
    /// Behind an `Arc` so that subscribers get the state without a copy; `apply` copies it once
    /// per batch (copy-on-write) while subscribers still hold the previous version.
    state: Arc<ClusterState>,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    /// Objects carried by the entries applied since the state of the last snapshot.
    bulk: usize,
    /// The last applied entry was a staged part: more of the same change is coming, and a
    /// snapshot now would leave the rest of it in the log.
    staging: bool,
}

/// From this many objects in the log since the last snapshot, a snapshot is wanted at once.
/// A new leader finds its followers' log position by sending entries from the middle of its
/// log; with a 100 000-policy seed there (200 parts of ~25 KB) that took ~100 appends, and the
/// leader's first commit, and with it every failover it decides, waited for them.
pub const COMPACT_OBJECTS: usize = 2000;

impl SmData {
    fn applied(&self) -> Applied {
        Applied {
            index: self.last_applied.map_or(0, |l| l.index),
            term: self.last_applied.map_or(0, |l| l.leader_id.get_term()),
            state: self.state.clone(),
            membership: self.membership.clone(),
            compact: self.bulk >= COMPACT_OBJECTS && !self.staging,
        }
    }
}

/// The objects an entry carries (a staged part's own), for [`SmData::bulk`].
fn bulk_of(cmd: &Command) -> usize {
    match cmd {
        Command::Stage { command, .. } => command.object_count(),
        c if c.is_object_change() => c.object_count(),
        _ => 0,
    }
}

struct SmInner {
    db: Arc<Db>,
    data: Mutex<SmData>,
    tx: watch::Sender<Applied>,
    events: EventLog,
}

/// The state machine: `ClusterState` in memory, snapshots in the database. Cheap to clone; the
/// snapshot builder openraft asks for is a clone.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<SmInner>,
}

impl StateMachineStore {
    /// Changes to the applied state, published after every applied batch and snapshot install,
    /// so the daemon can react to a committed change at once instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<Applied> {
        self.inner.tx.subscribe()
    }

    /// The events of the changes this node applied (and the daemon's own).
    pub fn events(&self) -> EventLog {
        self.inner.events.clone()
    }

    /// The state as of the last applied entry.
    pub fn current(&self) -> Applied {
        self.inner.tx.borrow().clone()
    }

    fn lock(&self) -> MutexGuard<'_, SmData> {
        // A panic while holding the lock cannot leave `SmData` half-updated in a way that matters
        // more than stopping the node would: keep serving.
        self.inner.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (payload, meta) = {
            let mut data = self.lock();
            let snapshot_id = match data.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, unix_nanos()),
                None => format!("empty-{}", unix_nanos()),
            };
            let meta = Meta {
                last_log_id: data.last_applied,
                last_membership: data.membership.clone(),
                snapshot_id,
            };
            let payload = SnapshotPayload {
                last_applied: data.last_applied,
                membership: data.membership.clone(),
                state: (*data.state).clone(),
            };
            data.bulk = 0;
            self.inner.tx.send_replace(data.applied());
            (payload, meta)
        };
        // Encoding 100 000 policies takes tens of milliseconds: not on the async threads.
        let db = self.inner.db.clone();
        let m = meta.clone();
        let bytes = blocking(move || {
            let bytes = to_store(&payload)?;
            db.put_snapshot(&m, &bytes, true)?;
            Ok(bytes)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, Membership)> {
        let data = self.lock();
        Ok((data.last_applied, data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut guard = self.lock();
        let data = &mut *guard;
        let mut responses = Vec::new();
        for entry in entries {
            data.last_applied = Some(entry.log_id);
            let resp = match entry.payload {
                EntryPayload::Blank => CommandResponse::default(),
                EntryPayload::Normal(super::codec::Versioned(cmd)) => {
                    let index = entry.log_id.index;
                    data.bulk += bulk_of(&cmd);
                    data.staging = matches!(cmd, Command::Stage { .. });
                    let state = &mut data.state;
                    let mut apply = || Arc::make_mut(state).apply_described(&cmd, index);
                    // A change of many objects (a seed of 100 000 policies: ~0.4 s) would hold
                    // this runtime thread, and with it heartbeats, votes and renewals; so would
                    // a CIDR edit of a 100 000-CIDR policy (3–8 ms: its lists are checked whole).
                    let heavy = cmd.is_object_change()
                        || matches!(
                            cmd,
                            Command::Commit { .. } | Command::EditPolicyCidrs { .. }
                        );
                    let started = Instant::now();
                    let (mut resp, events) = if heavy { crate::heavy(apply) } else { apply() };
                    tracing::debug!(
                        index,
                        command = cmd.kind(),
                        took_ms = started.elapsed().as_secs_f64() * 1e3,
                        "applied"
                    );
                    for e in events {
                        self.inner.events.push(e, Some(entry.log_id.index));
                    }
                    resp.index = entry.log_id.index;
                    resp
                }
                EntryPayload::Membership(m) => {
                    data.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResponse::default()
                }
            };
            responses.push(resp);
        }
        if !responses.is_empty() {
            // Published under the lock so subscribers never see batches out of order.
            self.inner.tx.send_replace(data.applied());
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Persists the received snapshot first, then replaces the in-memory state: if persisting
    /// fails, the node keeps its old, consistent state and openraft sees the error.
    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let db = self.inner.db.clone();
        let m = meta.clone();
        let payload: SnapshotPayload = blocking(move || {
            let payload = from_store(&bytes)?;
            db.put_snapshot(&m, &bytes, false)?;
            Ok(payload)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?;
        let mut data = self.lock();
        // The meta is authoritative for the log position; the payload carries the state.
        data.state = Arc::new(payload.state);
        data.last_applied = meta.last_log_id;
        data.membership = meta.last_membership.clone();
        data.bulk = 0;
        self.inner.tx.send_replace(data.applied());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored = self
            .inner
            .db
            .snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?;
        Ok(stored.map(|(meta, bytes)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

/// Makes snapshot ids unique across rebuilds at the same log id, also across restarts.
fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Command;
    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, Membership as RaftMembership};
    use std::collections::BTreeSet;

    struct TempStoreBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempStoreBuilder {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachineStore)> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let (log, sm) = open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite. It builds a fresh runtime per case, so it must run
    /// outside any tokio runtime (plain `#[test]`).
    #[test]
    fn openraft_conformance_suite() -> anyhow::Result<()> {
        Suite::test_all(TempStoreBuilder)?;
        Ok(())
    }

    fn lid(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn normal(term: u64, index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: lid(term, index),
            payload: EntryPayload::Normal(crate::cluster::codec::Versioned(cmd)),
        }
    }

    fn membership(term: u64, index: u64) -> Entry<TypeConfig> {
        let voters: BTreeSet<NodeId> = [1].into_iter().collect();
        Entry {
            log_id: lid(term, index),
            payload: EntryPayload::Membership(RaftMembership::new(vec![voters], None)),
        }
    }

    fn cordon(term: u64, index: u64, node: &str) -> Entry<TypeConfig> {
        normal(term, index, Command::Cordon(node.into()))
    }

    #[tokio::test]
    async fn log_vote_and_committed_survive_reopen() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let (mut log, _sm) = open(dir.path())?;
            log.blocking_append([membership(1, 0), cordon(1, 1, "a"), cordon(1, 2, "b")])
                .await?;
            log.save_vote(&Vote::new_committed(1, 1)).await?;
            log.save_committed(Some(lid(1, 2))).await?;
        }
        let (mut log, _sm) = open(dir.path())?;
        let st = log.get_log_state().await?;
        assert_eq!(st.last_purged_log_id, None);
        assert_eq!(st.last_log_id, Some(lid(1, 2)));
        let got = log.try_get_log_entries(0..).await?;
        assert_eq!(
            got.iter().map(|e| e.log_id).collect::<Vec<_>>(),
            [lid(1, 0), lid(1, 1), lid(1, 2)]
        );
        assert!(
            matches!(&got[2].payload, EntryPayload::Normal(crate::cluster::codec::Versioned(Command::Cordon(n))) if n == "b")
        );
        assert_eq!(log.read_vote().await?, Some(Vote::new_committed(1, 1)));
        assert_eq!(log.read_committed().await?, Some(lid(1, 2)));
        Ok(())
    }

    #[tokio::test]
    async fn state_machine_reopens_from_its_snapshot_and_notifies() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let (_log, mut sm) = open(dir.path())?;
            let mut rx = sm.subscribe();
            let resp = sm
                .apply([membership(1, 0), cordon(1, 1, "a"), cordon(1, 2, "a")])
                .await?;
            assert_eq!(
                resp.iter().map(|r| r.changed).collect::<Vec<_>>(),
                [false, true, false]
            );
            assert!(rx.has_changed().unwrap_or(false));
            let seen = rx.borrow_and_update().clone();
            assert_eq!(seen.index, 2);
            assert!(seen.state.cordoned.contains("a"));
            assert_eq!(seen.membership.log_id(), &Some(lid(1, 0)));

            let snap = sm.get_snapshot_builder().await.build_snapshot().await?;
            assert_eq!(snap.meta.last_log_id, Some(lid(1, 2)));
            // Applied after the snapshot, not in it: lost from memory on restart (openraft
            // re-applies it from the log up to the committed id).
            sm.apply([cordon(1, 3, "b")]).await?;
            assert!(sm.current().state.cordoned.contains("b"));
        }
        let (_log, mut sm) = open(dir.path())?;
        let (applied, mem) = sm.applied_state().await?;
        assert_eq!(applied, Some(lid(1, 2)));
        assert_eq!(mem.log_id(), &Some(lid(1, 0)));
        let cur = sm.current();
        assert_eq!(cur.index, 2);
        assert!(cur.state.cordoned.contains("a"));
        assert!(!cur.state.cordoned.contains("b"));
        let snap = sm.get_current_snapshot().await?;
        assert_eq!(snap.map(|s| s.meta.last_log_id), Some(Some(lid(1, 2))));
        Ok(())
    }

    /// A store of the versions that kept the snapshot in the log's database: the first open
    /// moves it into its own database, and the state comes back from it.
    #[tokio::test]
    async fn a_snapshot_in_the_log_database_moves_to_its_own() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let (_log, mut sm) = open(dir.path())?;
            sm.apply([membership(1, 0), cordon(1, 1, "a")]).await?;
            sm.get_snapshot_builder().await.build_snapshot().await?;
        }
        // Where the earlier versions wrote it.
        let (meta, data) = {
            let snaps = redb::Database::open(dir.path().join(SNAP_FILE))?;
            let txn = snaps.begin_write()?;
            let got = {
                let mut table = txn.open_table(SNAPSHOT)?;
                let meta = table.remove(KEY_SNAP_META)?.map(|v| v.value().to_vec());
                let data = table.remove(KEY_SNAP_DATA)?.map(|v| v.value().to_vec());
                (meta.expect("meta"), data.expect("data"))
            };
            txn.commit()?;
            got
        };
        {
            let db = redb::Database::open(dir.path().join(DB_FILE))?;
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(SNAPSHOT)?;
                table.insert(KEY_SNAP_META, meta.as_slice())?;
                table.insert(KEY_SNAP_DATA, data.as_slice())?;
            }
            txn.commit()?;
        }
        {
            let (_log, mut sm) = open(dir.path())?;
            assert!(
                sm.current().state.cordoned.contains("a"),
                "state not restored"
            );
            let snap = sm.get_current_snapshot().await?;
            assert_eq!(snap.map(|s| s.meta.last_log_id), Some(Some(lid(1, 1))));
        }
        let db = redb::Database::open(dir.path().join(DB_FILE))?;
        let txn = db.begin_read()?;
        assert!(
            txn.open_table(SNAPSHOT)?.get(KEY_SNAP_DATA)?.is_none(),
            "the old copy stayed in the log's database"
        );
        Ok(())
    }

    /// Staged parts of a large change raise the compaction flag (a snapshot is wanted), small
    /// commands do not, and building the snapshot lowers it again for the subscribers.
    #[tokio::test]
    async fn many_objects_in_the_log_ask_for_a_snapshot() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_log, mut sm) = open(dir.path())?;
        let rx = sm.subscribe();
        let part = |txn: u64, n: usize| {
            let policies = (0..n)
                .map(|i| crate::model::Policy {
                    name: format!("p{txn}-{i}"),
                    egress_gateway_name: "gw".into(),
                    source_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                    destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
                    excluded_cidrs: vec![],
                })
                .collect();
            Command::Stage {
                txn,
                part: 0,
                command: Box::new(Command::Apply {
                    gateways: vec![],
                    policies,
                }),
            }
        };
        sm.apply([membership(1, 0), cordon(1, 1, "a")]).await?;
        for i in 2..200 {
            sm.apply([cordon(1, i, "a")]).await?;
        }
        assert!(!rx.borrow().compact, "small commands never ask");
        sm.apply([normal(1, 200, part(1, COMPACT_OBJECTS - 1))])
            .await?;
        assert!(!rx.borrow().compact);
        sm.apply([normal(1, 201, part(2, 1))]).await?;
        assert!(
            !rx.borrow().compact,
            "{COMPACT_OBJECTS} objects, but more parts may follow"
        );
        sm.apply([cordon(1, 202, "b")]).await?;
        assert!(rx.borrow().compact, "the staged change is over: it asks");
        sm.get_snapshot_builder().await.build_snapshot().await?;
        assert!(!rx.borrow().compact, "the snapshot took them");
        assert_eq!(rx.borrow().index, 202);
        Ok(())
    }

    #[tokio::test]
    async fn installed_snapshot_replaces_state_and_persists() -> anyhow::Result<()> {
        let leader_dir = tempfile::tempdir()?;
        let follower_dir = tempfile::tempdir()?;
        let (_l, mut leader) = open(leader_dir.path())?;
        leader.apply([membership(1, 0), cordon(1, 1, "x")]).await?;
        let snap = leader.get_snapshot_builder().await.build_snapshot().await?;
        {
            let (_f, mut follower) = open(follower_dir.path())?;
            let rx = follower.subscribe();
            follower.apply([cordon(1, 0, "stale")]).await?;
            let mut recv = follower.begin_receiving_snapshot().await?;
            *recv = *snap.snapshot;
            follower.install_snapshot(&snap.meta, recv).await?;
            let seen = rx.borrow().clone();
            assert_eq!(seen.index, 1);
            assert!(seen.state.cordoned.contains("x"));
            assert!(!seen.state.cordoned.contains("stale"));
        }
        let (_f, follower) = open(follower_dir.path())?;
        assert!(follower.current().state.cordoned.contains("x"));
        Ok(())
    }

    #[tokio::test]
    async fn purge_deletes_entries_and_reports_purged_id() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let (mut log, _sm) = open(dir.path())?;
            let entries: Vec<_> = (0..10).map(|i| cordon(1, i, "n")).collect();
            log.blocking_append(entries).await?;
            log.purge(lid(1, 6)).await?;
            let st = log.get_log_state().await?;
            assert_eq!(st.last_purged_log_id, Some(lid(1, 6)));
            assert_eq!(st.last_log_id, Some(lid(1, 9)));
            let left: Vec<u64> = log
                .try_get_log_entries(0..100)
                .await?
                .iter()
                .map(|e| e.log_id.index)
                .collect();
            assert_eq!(left, [7, 8, 9]);
        }
        // Really gone from the file, and the purged id is durable.
        let (mut log, _sm) = open(dir.path())?;
        let st = log.get_log_state().await?;
        assert_eq!(st.last_purged_log_id, Some(lid(1, 6)));
        let raw = log.db.db.begin_read()?;
        let table = raw.open_table(LOGS)?;
        assert_eq!(redb::ReadableTableMetadata::len(&table)?, 3);
        Ok(())
    }

    /// Append+fsync latency of single-entry appends, as the Raft core sees it (including the
    /// hop to the blocking pool). Run with `--ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn bench_single_entry_append_latency() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (mut log, _sm) = open(dir.path())?;
        let mut times = Vec::with_capacity(1000);
        for i in 0..1000 {
            let start = std::time::Instant::now();
            log.blocking_append([cordon(1, i, "gw-node-1")]).await?;
            times.push(start.elapsed());
        }
        report("append via RaftLogStorage::append", &mut times);
        // The same without the blocking-pool hop, to see what the hop costs.
        for i in 1000..2000 {
            let start = std::time::Instant::now();
            log.db.append(&[cordon(1, i, "gw-node-1")])?;
            times.push(start.elapsed());
        }
        report("Db::append inline", &mut times);
        Ok(())
    }

    fn report(what: &str, times: &mut Vec<std::time::Duration>) {
        times.sort();
        let n = times.len();
        println!(
            "{what}, {n} single-entry appends (commit+fsync each): median {:?}, p90 {:?}, p99 {:?}, max {:?}",
            times[n / 2],
            times[n * 9 / 10],
            times[n * 99 / 100],
            times[n - 1]
        );
        times.clear();
    }
}
